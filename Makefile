# Two commands set everything up on a fresh machine (see README):
#   make quickstart   install, build a tokenizer + MDS data from the embedded corpus, train the quickstart recipe
#   make test         install with test extras, lint, run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
QUICKSTART ?= recipes/quickstart/mosaicbert-tiny.yaml
DATA ?= data/quickstart

.PHONY: install install-dev quickstart quickstart-data test lint

install:
	$(PIP) install -e .

install-dev:
	$(PIP) install -e ".[dev]"

quickstart-data:
	llmfoundry-lite data tokenizer --train --kind wordpiece --source embedded --vocab-size 4096 --out $(DATA)/tokenizer
	llmfoundry-lite data convert --source embedded --out $(DATA)/mds --splits train,val

quickstart: install quickstart-data
	llmfoundry-lite train $(QUICKSTART)

lint:
	ruff check .
	ruff format --check .

test: install-dev lint
	$(PYTHON) -m pytest -q
