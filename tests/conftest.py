"""Shared fixtures: offline environment, the checkout first on the import path, and tokenizers and data built
locally from the embedded corpus (once per test run: session-scoped)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checkout_first(paths: list[str]) -> list[str]:
    """``paths`` with the checkout moved to the front: a wheel of this package elsewhere (the GPU image's site
    folder, another worktree's install) must never shadow the code under test."""
    return [str(ROOT), *(p for p in paths if os.path.abspath(p or os.curdir) != str(ROOT))]


# In this process, and in every subprocess a test starts (from any directory: tests run in their tmp_path).
sys.path[:] = _checkout_first(sys.path)
os.environ["PYTHONPATH"] = os.pathsep.join(
    _checkout_first([p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Seconds a session fixture may take to build (seconds when idle; a hang guard, generous for a loaded machine).
FIXTURE_BUDGET = 900


@contextlib.contextmanager
def fixture_budget(what: str, seconds: float = FIXTURE_BUDGET) -> Iterator[None]:
    """Fail the fixture ``what`` if building it takes over ``seconds`` (pytest-timeout times test functions only).

    A session fixture that fails is not built again: pytest reports the same error for every test that uses it.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def over(signum, frame):
        pytest.fail(f"building {what} took over its {seconds:.0f} s budget", pytrace=False)

    previous = signal.signal(signal.SIGALRM, over)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def bert_tokenizer_dir(tmp_path_factory):
    """A small WordPiece (BERT-style) tokenizer trained on the embedded corpus, in HF format."""
    from llmfoundry_lite.data.corpus import embedded_documents
    from llmfoundry_lite.data.tokenizers import train_tokenizer

    out = tmp_path_factory.mktemp("tok-wordpiece")
    with fixture_budget("the WordPiece test tokenizer"):
        return str(train_tokenizer("wordpiece", embedded_documents(), vocab_size=2000, out_dir=out))


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE (LLaMA-style) tokenizer trained on the embedded corpus, in HF format."""
    from llmfoundry_lite.data.corpus import embedded_documents
    from llmfoundry_lite.data.tokenizers import train_tokenizer

    out = tmp_path_factory.mktemp("tok-bpe")
    with fixture_budget("the BPE test tokenizer"):
        return str(train_tokenizer("bpe", embedded_documents(), vocab_size=2000, out_dir=out))


@pytest.fixture(scope="session")
def mlm_mds_dir(tmp_path_factory):
    """The embedded corpus as raw-text MDS shards (train/val), for MLM runs."""
    from llmfoundry_lite.data.convert import convert

    out = tmp_path_factory.mktemp("mds-text") / "embedded"
    with fixture_budget("the raw-text MDS shards"):
        convert("embedded", out, splits=("train", "val"))
    return str(out)


def mds_samples(split_dir: str | Path) -> int:
    """The samples of one MDS split folder, from its index.json."""
    index = json.loads((Path(split_dir) / "index.json").read_text())
    return sum(shard["samples"] for shard in index["shards"])


@pytest.fixture(scope="session")
def mlm_samples(mlm_mds_dir) -> dict[str, int]:
    """Samples per split of ``mlm_mds_dir``: the embedded corpus is Python's own docs, whose size varies by release."""
    return {split: mds_samples(Path(mlm_mds_dir) / split) for split in ("train", "val")}


@pytest.fixture(scope="session")
def causal_mds_dir(tmp_path_factory, llama_tokenizer_dir):
    """The embedded corpus as concatenated 128-token rows (train/val), for causal LM runs."""
    from llmfoundry_lite.data.convert import convert

    out = tmp_path_factory.mktemp("mds-tokens") / "embedded-128"
    with fixture_budget("the 128-token MDS shards"):
        convert("embedded", out, splits=("train", "val"), tokenizer=llama_tokenizer_dir, concat_tokens=128)
    return str(out)


@pytest.fixture
def tiny_bert(bert_tokenizer_dir, mlm_mds_dir, tmp_path):
    """A function giving overrides that shrink the quickstart recipe to a seconds-long CPU run in ``tmp_path``."""

    def overrides(**extra) -> list[str]:
        return _tiny_bert_overrides(bert_tokenizer_dir, mlm_mds_dir, tmp_path, **extra)

    return overrides


def _tiny_bert_overrides(tokenizer_dir: str, data_dir: str, tmp_path, **extra) -> list[str]:
    values = {
        "variables.tokenizer_path": tokenizer_dir,
        "variables.data_local": data_dir,
        "max_seq_len": 32,
        "model.d_model": 32,
        "model.n_layers": 1,
        "model.n_heads": 2,
        "model.intermediate_size": 64,
        "global_train_batch_size": 4,
        "device_train_microbatch_size": 4,
        "device_eval_batch_size": 4,
        "max_duration": "4ba",
        "eval_interval": "2ba",
        "eval_subset_num_batches": 1,
        "save_interval": "2ba",
        "save_folder": str(tmp_path / "runs" / "{run_name}"),
        "console_log_interval": "1ba",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def bert_tok(bert_tokenizer_dir):
    """The WordPiece test tokenizer, loaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bert_tokenizer_dir)


@pytest.fixture(scope="session")
def llama_tok(llama_tokenizer_dir):
    """The byte-level BPE test tokenizer, loaded."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_tokenizer_dir)


_network_log: list | None = None


def _audit_network(event: str, args: tuple) -> None:
    if _network_log is None:
        return
    if event == "socket.getaddrinfo" and args[0] not in (None, "localhost", "127.0.0.1", "::1"):
        _network_log.append(f"name lookup of {args[0]}")
    elif event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in ("127.0.0.1", "::1"):
        _network_log.append(f"connection to {args[1]}")


@pytest.fixture
def network_attempts():
    """What this process tries to reach beyond localhost during the test (Python's audit hooks: nothing is
    blocked), so "no retries against a hub" is asserted as no attempt at all rather than as a time margin."""
    global _network_log
    if not getattr(_audit_network, "installed", False):
        sys.addaudithook(_audit_network)  # for the rest of the process: hooks cannot be removed
        _audit_network.installed = True
    _network_log = []
    try:
        yield _network_log
    finally:
        _network_log = None


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own folder, so default run folders (runs/<name>) never land in the checkout."""
    monkeypatch.chdir(tmp_path)
