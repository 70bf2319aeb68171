# make train  : set up .venv (if no virtualenv is active), then train on the default corpus
# make repl   : autocomplete REPL on the trained model
# make test   : set up, then run the test suite (what CI runs)
# make bench  : speed and memory benchmarks
# Pass extra flags with ARGS, e.g.  make train ARGS="--epochs 2 --overwrite"

SHELL := /bin/bash
PYTHON ?= python3
# Local corpus mirror: WikiText-2 / PTB as NAME/{train,valid,test}.txt. Without one,
# corpora come from the Hugging Face hub.
LM_CORPORA ?= $(if $(wildcard ../shared/corpora),$(abspath ../shared/corpora),)
export LM_CORPORA

ifdef VIRTUAL_ENV
BIN := $(VIRTUAL_ENV)/bin
else
BIN := .venv/bin
endif
STAMP := $(BIN)/.lm-installed
CORPUS ?= wikitext-2
RUN ?= checkpoints/$(CORPUS)
CKPT ?= $(RUN)/best.pt

.PHONY: install train eval repl test test-slow bench clean

install: $(STAMP)

# torch first, pinned, so that pip takes the CPU build on disk instead of pulling CUDA.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv .venv
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0 \
	  || $(BIN)/python -m pip install -q --disable-pip-version-check 'torch>=2.2,<3'
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

train: install
	$(BIN)/lm train --corpus $(CORPUS) --run $(RUN) $(ARGS)

eval: install
	$(BIN)/lm eval $(CKPT) --split test $(ARGS)

repl: install
	$(BIN)/lm repl $(CKPT) $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

# -rP prints what the slow tests report when they pass (the fault-injection figures)
test-slow: install
	$(BIN)/python -m pytest -q -m slow -rP $(ARGS)

bench: install
	$(BIN)/lm bench $(ARGS)

clean:
	rm -rf .venv .pytest_cache corpora/.cache
