"""How an engine chooses tokens from its logits: greedy or sampled, batched over a step's rows, with
entropy and log-probabilities of the model's own distribution, and speculative sampling's rule.

The sampling distribution of a row: the model's distribution p over the served vocabulary, raised to
1/temperature and renormalized, then truncated to the tokens that pass all of top-k, top-p and min-p
(each judged on the tempered distribution), renormalized. A token is drawn by inverse CDF over the
tokens ordered most likely first (ties by id) with u = common.draws.uniform(seed, position, TOKEN).
Temperature 0 is the argmax, exactly as greedy decoding.
"""

from dataclasses import dataclass

import torch

from common.draws import ACCEPT, RESIDUAL, TOKEN, uniform
from rstitch.v1 import engine_pb2 as pb

from .entropy import greedy_with_entropy, normalized_entropy


@dataclass
class Choice:
    """The chosen tokens of a batch of rows, with what their spans may report."""
    tokens: list[int]
    entropies: list[float]
    logprobs: list[pb.TokenLogprobs | None]
    distributions: list[pb.Distribution | None]


@dataclass(frozen=True)
class RowRequest:
    """What one row's span asks of its choice."""
    sampling: pb.Sampling
    position: int  # the answer position of the token chosen
    top_logprobs: int = -1  # -1: no logprobs; else the chosen token's and this many alternatives'
    distribution: bool = False


def sampled(sampling: pb.Sampling) -> bool:
    return sampling.temperature > 0


def choose(logits: torch.Tensor, vocab_size: int, rows: list[RowRequest]) -> Choice:
    """One token per row of logits [R, V_padded]: greedy rows the argmax, sampled rows a draw."""
    logits = logits[:, :vocab_size].float()
    entropies = normalized_entropy(logits, vocab_size).tolist()
    tokens = logits.argmax(-1).tolist()
    # Greedy rows choose from a point mass: that is the distribution they report when asked.
    distributions: list[pb.Distribution | None] = [
        pb.Distribution(token_ids=[token], probs=[1.0]) if row.distribution else None
        for token, row in zip(tokens, rows)]
    picked = [i for i, row in enumerate(rows) if sampled(row.sampling)]
    if picked:
        probs = sampling_probs(logits[picked], [rows[i].sampling for i in picked])
        draws = [uniform(rows[i].sampling.seed, rows[i].position, TOKEN) for i in picked]
        for i, token in zip(picked, draw(probs, draws)):
            tokens[i] = token
        for n, i in enumerate(picked):
            if rows[i].distribution:
                distributions[i] = sparse(probs[n])
    return Choice(tokens, entropies, logprobs_of(logits, tokens, rows), distributions)


def sampling_probs(logits: torch.Tensor, samplings: list[pb.Sampling]) -> torch.Tensor:
    """The sampling distribution of each row of logits [R, V] (served columns only), float32."""
    device = logits.device
    temperature = torch.tensor([s.temperature for s in samplings], device=device)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True)
    ranked = order.values
    rank = torch.arange(ranked.shape[-1], device=device)[None, :]
    top_k = torch.tensor([s.top_k or ranked.shape[-1] for s in samplings], device=device)[:, None]
    top_p = torch.tensor([s.top_p if 0 < s.top_p < 1 else 1.0 for s in samplings], device=device)[:, None]
    min_p = torch.tensor([s.min_p for s in samplings], device=device)[:, None]
    before = ranked.cumsum(-1) - ranked  # mass of the more likely tokens
    keep = (rank < top_k) & ((before < top_p) | (rank == 0)) & (ranked >= min_p * ranked[:, :1])
    kept = torch.zeros_like(probs).scatter_(-1, order.indices, ranked * keep)
    return kept / kept.sum(-1, keepdim=True)


def draw(probs: torch.Tensor, us: list[float]) -> list[int]:
    """Inverse-CDF draws from each row of probs [R, V], most likely tokens first (ties by id)."""
    order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cdf = order.values.double().cumsum(-1)
    u = torch.tensor(us, dtype=torch.float64, device=probs.device)[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)
    # Past the mass (rounding): the last token with mass, never a truncated one.
    index = torch.minimum(index, (order.values > 0).sum(-1, keepdim=True) - 1)
    return order.indices.gather(-1, index)[:, 0].tolist()


def sparse(probs: torch.Tensor) -> pb.Distribution:
    ids = probs.nonzero()[:, 0]
    return pb.Distribution(token_ids=ids.tolist(), probs=probs[ids].tolist())


def dense(distribution: pb.Distribution, vocab_size: int, device) -> torch.Tensor:
    probs = torch.zeros(vocab_size, device=device)
    probs[torch.tensor(list(distribution.token_ids), dtype=torch.long, device=device)] = \
        torch.tensor(list(distribution.probs), device=device)
    return probs


def logprobs_of(logits: torch.Tensor, tokens: list[int], rows: list[RowRequest]) -> list[pb.TokenLogprobs | None]:
    """The chosen token's log-probability under the model's own distribution, and the top ones'."""
    wanted = [i for i, row in enumerate(rows) if row.top_logprobs >= 0]
    out: list[pb.TokenLogprobs | None] = [None] * len(rows)
    if not wanted:
        return out
    logp = torch.log_softmax(logits[wanted], dim=-1)
    chosen = logp.gather(-1, torch.tensor([[tokens[i]] for i in wanted], device=logits.device))[:, 0].tolist()
    most = max(rows[i].top_logprobs for i in wanted)
    top = torch.topk(logp, min(most, logp.shape[-1]), dim=-1) if most else None
    for n, i in enumerate(wanted):
        k = rows[i].top_logprobs
        out[i] = pb.TokenLogprobs(logprob=chosen[n],
                                  top_token_ids=top.indices[n, :k].tolist() if k else [],
                                  top_logprobs=top.values[n, :k].tolist() if k else [])
    return out


def speculative_accept(logits: torch.Tensor, drafted: list[int], drafts: list[pb.Distribution], vocab_size: int,
                       sampling: pb.Sampling, position: int) -> tuple[int, int]:
    """Speculative sampling over the verifier's logits [k + 1, V] after the token before each of the k
    drafted tokens and after the last: how many drafted tokens are accepted, and the next token (the
    residual draw at the first rejection, or a draw from the last row when all are accepted)."""
    p = sampling_probs(logits[:, :vocab_size].float(), [sampling] * logits.shape[0])
    for j, (token, draft) in enumerate(zip(drafted, drafts)):
        q = dense(draft, vocab_size, logits.device)
        if q[token] <= 0:
            raise ValueError(f"drafted token {token} has probability 0 in its draft distribution")
        if uniform(sampling.seed, position + j, ACCEPT) < min(1.0, (p[j, token] / q[token]).item()):
            continue
        residual = (p[j] - q).clamp_(min=0)
        return j, draw(residual[None] / residual.sum(), [uniform(sampling.seed, position + j, RESIDUAL)])[0]
    k = len(drafted)
    return k, draw(p[k:k + 1], [uniform(sampling.seed, position + k, TOKEN)])[0]


def fill_verification(response: pb.PrefillResponse, rows: torch.Tensor, tokens: list[int],
                      drafts: list[pb.Distribution], rule: pb.SpanRule, vocab_size: int,
                      entropies_known: bool = True) -> None:
    """A verify call's answer from the logits [n, V] after each of its n appended tokens: the greedy
    choice after each one; with drafts (the last len(drafts) tokens), speculative sampling's outcome.
    entropies_known=False: only the last row is whole (the others' entropies are reported NaN)."""
    greedy, entropies = greedy_with_entropy(rows, vocab_size)
    if not entropies_known:
        entropies[:-1] = [float("nan")] * (len(entropies) - 1)
    response.greedy_token_ids.extend(greedy)
    response.greedy_entropies.extend(entropies)
    if not drafts:
        if rule.logprobs:
            requests = [RowRequest(rule.sampling, 0, rule.top_logprobs)] * len(greedy)
            response.greedy_logprobs.extend(logprobs_of(rows[:, :vocab_size].float(), greedy, requests))
        return
    k = len(drafts)
    drafted_rows = rows[-k - 1:]
    accepted, token = speculative_accept(drafted_rows, tokens[-k:], drafts, vocab_size, rule.sampling, rule.position)
    response.accepted, response.next_token_id = accepted, token
    response.next_entropy = entropies[len(entropies) - k - 1 + accepted]
    if rule.logprobs:
        request = RowRequest(rule.sampling, rule.position + accepted, rule.top_logprobs)
        response.next_logprobs.CopyFrom(
            logprobs_of(drafted_rows[accepted:accepted + 1, :vocab_size].float(), [token], [request])[0])
