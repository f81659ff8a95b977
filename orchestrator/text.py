"""Text in, text out with the engines' shared tokenizer (fetched from an engine: no model files here)."""

import tempfile
from pathlib import Path

from rstitch.v1 import orchestrator_pb2 as opb


def load_tokenizer(files: dict[str, bytes]):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            (Path(tmp) / Path(name).name).write_bytes(content)
        return AutoTokenizer.from_pretrained(tmp)


def encode_prompt(tokenizer, spec: opb.GenerationSpec) -> list[int]:
    kind = spec.WhichOneof("prompt")
    if kind == "token_ids":
        return list(spec.token_ids.token_ids)
    if kind == "messages":
        messages = [{"role": m.role, "content": m.content} for m in spec.messages.messages]
    elif spec.raw or not tokenizer.chat_template:
        return tokenizer.encode(spec.text)
    else:
        messages = [{"role": "user", "content": spec.text}]
    if not tokenizer.chat_template:
        raise ValueError("the model has no chat template; send text or token ids instead of messages")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


class IncrementalText:
    """Turns growing token ids into text deltas, holding back a character split across tokens.

    Each push decodes only a short window (the tokens since the last emitted text, after the one
    before), as TGI's and vLLM's detokenizers do, so a long answer costs O(n), not O(n^2)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # ids[prefix:read] were decoded into text already

    def push(self, token_ids) -> str:
        self.ids += token_ids
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.ids[self._prefix:self._read])
        after = decode(self.ids[self._prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta
