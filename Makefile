# The two entry points of the README. Both install what they need first.
PIP ?= python -m pip

.PHONY: install demo test protos

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ./client -e ".[dev]"

demo: install
	rstitch demo

test: install
	python -m pytest -q

protos:
	scripts/gen_protos.sh
