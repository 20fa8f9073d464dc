# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build (a bare `torch` would pull a multi-GB CUDA wheel)
	$(BIN)/pip install -q --disable-pip-version-check "torch>=2.13,<2.14"
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,export,eval,lsp]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py

lint: install
	$(BIN)/ruff check vlmspec tests bench scripts

test: lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/pytest -q -m "not slow"

test-all: lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/pytest -q

bench: install
	$(BIN)/python bench/frontend.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
