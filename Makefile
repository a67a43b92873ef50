# Two commands set everything up on a fresh machine (see README):
#   make quickstart   install, build a tokenizer + MDS data from the embedded corpus, train the quickstart recipe
#   make test         install with test extras, lint, run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
QUICKSTART ?= recipes/quickstart/mosaicbert-tiny.yaml
DATA ?= data/quickstart
# make gpu-check [WHEELS=dir]: wheels from scripts/gpu_wheels.sh, installed --no-deps into GPU_SITE.
WHEELS ?=
GPU_SITE ?= build/gpu-site
GPU_CHECK_OUT ?= gpu_check.json

.PHONY: install install-dev quickstart quickstart-data quickstart-llama test lint gpu-check

install:
	$(PIP) install -e .

install-dev:
	$(PIP) install -e ".[dev,eval]"

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

# Two pytest processes: Composer keeps every Trainer's state registered with atexit (never released on close()),
# and with it each StreamingDataset's shared-memory files, so one process running every in-process training test
# approaches the open-file limit. Splitting by file keeps each half far below it.
TESTS_A = $(sort $(wildcard tests/test_[a-f]*.py))
TESTS_B = $(filter-out $(TESTS_A),$(sort $(wildcard tests/test_*.py)))
test: install-dev lint
	$(PYTHON) -m pytest -q $(TESTS_A)
	$(PYTHON) -m pytest -q $(TESTS_B)

# One command that checks a GPU (scripts/gpu_check.py: versions, bf16 peak, ours vs transformers, Trainer runs with
# FSDP and resume). On a machine without internet, WHEELS=dir installs the wheels of `scripts/gpu_wheels.sh dir`
# into GPU_SITE with --no-deps, ahead of the image's packages on PYTHONPATH; its torch, numpy, torchmetrics stay.
gpu-check:
ifneq ($(strip $(WHEELS)),)
	$(PIP) install --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(WHEELS)/*.whl
	PYTHONPATH="$(CURDIR):$(abspath $(GPU_SITE))$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT)
else
	$(PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT)
endif
