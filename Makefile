# Two commands set everything up on a fresh machine (see README):
#   make quickstart   install, build a tokenizer + MDS data from the embedded corpus, train the quickstart recipe
#   make test         install with test extras, lint, run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
QUICKSTART ?= recipes/quickstart/mosaicbert-tiny.yaml
DATA ?= data/quickstart

.PHONY: install install-dev quickstart quickstart-data quickstart-llama test lint

install:
	$(PIP) install -e .

install-dev:
	$(PIP) install -e ".[dev]"

quickstart-data:
	llmfoundry-lite data tokenizer --train --kind wordpiece --source embedded --vocab-size 4096 --out $(DATA)/tokenizer
	llmfoundry-lite data convert --source embedded --out $(DATA)/mds --splits train,val

quickstart: install quickstart-data
	llmfoundry-lite train $(QUICKSTART)

# The LLaMA-style variant: byte-level BPE tokenizer, 128-token rows, tiny decoder; then export to Hugging Face.
quickstart-llama: install
	llmfoundry-lite data tokenizer --train --kind bpe --source embedded --vocab-size 4096 --out $(DATA)/bpe-tokenizer
	llmfoundry-lite data convert --source embedded --out $(DATA)/llama-mds --tokenizer $(DATA)/bpe-tokenizer --concat-tokens 128 --splits train,val
	llmfoundry-lite train recipes/quickstart/llama-tiny.yaml
	llmfoundry-lite export runs/llama-tiny/checkpoints/latest-rank0.pt runs/llama-tiny/hf

lint:
	ruff check .
	ruff format --check .

test: install-dev lint
	$(PYTHON) -m pytest -q
