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
GPU_CHECK_ARGS ?=
PYTEST_ARGS ?= --durations=25

.PHONY: install install-dev quickstart quickstart-data quickstart-llama test suite lint gpu-check

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

test: install-dev lint suite

# The test suite alone, with whatever is installed (CI's GPU-image rehearsal runs it on the image's stack). One
# process: a closed Trainer frees its state, shared memory and files (tests/test_trainer_release.py).
suite:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# One command that checks a GPU (scripts/gpu_check.py: versions, bf16 peak, ours vs transformers, Trainer runs with
# FSDP and resume). On a machine without internet, WHEELS=dir installs the wheels of `scripts/gpu_wheels.sh dir`
# into GPU_SITE with --no-deps, ahead of the image's packages on PYTHONPATH; its torch, numpy, torchmetrics stay.
gpu-check:
ifneq ($(strip $(WHEELS)),)
	$(PIP) install --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(WHEELS)/*.whl
	PYTHONPATH="$(CURDIR):$(abspath $(GPU_SITE))$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
else
	$(PYTHON) scripts/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
endif
