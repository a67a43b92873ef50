"""The `text` dataloader: batches from MDS shards, bad-input errors, and sample-exact resumption with Composer."""

from __future__ import annotations

import json
import os

import pytest
import torch
from composer.core import DataSpec

from llmfoundry_lite import registry
from llmfoundry_lite.data.convert import convert
from llmfoundry_lite.data.corpus import embedded_documents
from llmfoundry_lite.errors import RecipeError


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    convert("embedded", out, splits="train,val", val_fraction=0.1)
    return str(out)


@pytest.fixture(scope="module")
def concat_dir(tmp_path_factory, llama_tokenizer_dir):
    out = tmp_path_factory.mktemp("concat")
    convert(
        "embedded", out, splits="train,val", tokenizer=llama_tokenizer_dir, concat_tokens=64, num_workers=0
    )
    return str(out)


def _loader(tok, bs=4, **block) -> DataSpec:
    return registry.build(
        "dataloaders", {"name": "text", **block}, "train_loader", tokenizer=tok, device_batch_size=bs
    )


def test_mlm_batches_from_raw_text(raw_dir, bert_tok):
    spec = _loader(
        bert_tok,
        local=raw_dir,
        split="train",
        max_seq_len=48,
        shuffle=True,
        collator={"name": "mlm", "mlm_probability": 0.3},
    )
    assert isinstance(spec, DataSpec)
    batch = next(iter(spec.dataloader))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (4, 48) and batch["input_ids"].dtype == torch.long
    assert (batch["labels"] != -100).any()
    assert spec.get_num_tokens_in_batch(batch) == int(batch["attention_mask"].sum())


def test_split_smaller_than_a_batch_is_refused_before_any_worker_starts(raw_dir, bert_tok):
    """With drop_last such a loader yields nothing (Composer would loop over empty epochs); without, one batch."""
    from llmfoundry_lite.data.loaders import SplitTooSmall

    n = len(_loader(bert_tok, local=raw_dir, split="val", max_seq_len=32).dataloader.dataset)
    with pytest.raises(SplitTooSmall) as e:
        _loader(bert_tok, bs=n + 1, local=raw_dir, split="val", max_seq_len=32, num_workers=2)
    assert (e.value.per_rank, e.value.batch, e.value.total) == (n, n + 1, n)
    spec = _loader(bert_tok, bs=n + 1, local=raw_dir, split="val", max_seq_len=32, drop_last=False)
    assert [len(b["input_ids"]) for b in spec.dataloader] == [n]


def test_default_collator_follows_the_data(raw_dir, concat_dir, bert_tok, llama_tok):
    mlm = next(iter(_loader(bert_tok, local=raw_dir, split="val", max_seq_len=32).dataloader))
    assert (mlm["labels"] == -100).sum() > (mlm["labels"] != -100).sum()  # only masked positions carry labels
    spec = _loader(llama_tok, local=concat_dir, split="train", max_seq_len=64)
    causal = next(iter(spec.dataloader))
    assert torch.equal(causal["labels"], causal["input_ids"])
    assert spec.get_num_tokens_in_batch(causal) == 4 * 64


def test_causal_shorter_max_seq_len_and_sequence_id(concat_dir, llama_tok):
    spec = _loader(
        llama_tok,
        bs=2,
        local=concat_dir,
        split="val",
        max_seq_len=32,
        collator={"name": "causal_lm", "sequence_id": True},
    )
    batch = next(iter(spec.dataloader))
    assert batch["input_ids"].shape == (2, 32) and batch["sequence_id"].shape == (2, 32)
    assert (batch["sequence_id"][:, 1:] >= batch["sequence_id"][:, :-1]).all()


def test_shuffle_is_seeded(raw_dir, bert_tok):
    def first_ids(seed):
        spec = _loader(
            bert_tok,
            local=raw_dir,
            split="train",
            max_seq_len=16,
            shuffle=True,
            shuffle_seed=seed,
            collator={"name": "mlm", "mlm_probability": 0.01},
        )
        b = next(iter(spec.dataloader))
        return torch.where(b["labels"] != -100, b["labels"], b["input_ids"]).tolist()

    assert first_ids(1) == first_ids(1)
    assert first_ids(1) != first_ids(2)


def test_worker_processes_do_not_change_the_order(concat_dir, llama_tok):
    def first(num_workers):
        spec = _loader(
            llama_tok, local=concat_dir, split="train", max_seq_len=64, shuffle=True, num_workers=num_workers
        )
        out = []
        for i, b in enumerate(spec.dataloader):
            out.append(b["input_ids"].tolist())
            if i == 5:
                return out

    assert first(0) == first(2)


@pytest.mark.parametrize(
    "block, match",
    [
        ({"split": "test"}, "split 'test' not found.*available splits: train, val"),
        ({"split": None}, "no index.json in .*set `split:`"),
        ({"local": "/no/such/dataset", "split": "train"}, "/no/such/dataset.*data convert"),
        ({"split": "train", "max_seq_len": 128}, "max_seq_len 128 is larger than the 64-token rows"),
        ({"split": "train", "collator": {"name": "mlm"}}, "mask_token"),
        ({"split": "train", "local": None}, "set `local:`"),
    ],
)
def test_loader_bad_input(concat_dir, llama_tok, block, match):
    full = {"local": concat_dir, "max_seq_len": 64, **block}
    with pytest.raises(RecipeError, match=match):
        _loader(llama_tok, **full)


def test_folder_without_index(tmp_path, llama_tok):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard.00000.mds").write_bytes(b"\0" * 16)
    with pytest.raises(RecipeError, match=f"no index.json in '{tmp_path / 'train'}'"):
        _loader(llama_tok, local=str(tmp_path), split="train", max_seq_len=8)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_missing_or_corrupt_shard(tmp_path, concat_dir, llama_tok):
    d = _copy(os.path.join(concat_dir, "train"), tmp_path / "t")
    shard = d / "shard.00000.mds"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(RecipeError, match=f"shard '{shard}' has .* bytes.*truncated"):
        _loader(llama_tok, local=str(d), max_seq_len=64)
    shard.unlink()
    with pytest.raises(RecipeError, match="missing"):
        _loader(llama_tok, local=str(d), max_seq_len=64)
    (d / "index.json").write_text("{not json")
    with pytest.raises(RecipeError, match="corrupt MDS index"):
        _loader(llama_tok, local=str(d), max_seq_len=64)


def test_recipe_validation_checks_nested_collator(concat_dir):
    block = {"name": "text", "local": concat_dir, "max_seq_len": 64, "collator": {"name": "mlmm"}}
    with pytest.raises(RecipeError, match="did you mean 'mlm'"):
        registry.check_component("dataloaders", block, "train_loader")
    with pytest.raises(RecipeError, match="shuffle_sed"):
        registry.check_component("dataloaders", {**block, "collator": None, "shuffle_sed": 1}, "train_loader")


# ---------------------------------------------------------------------------------------------------------
# Deterministic resumption, sample by sample
# ---------------------------------------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


def _tiny_model(vocab: int):
    import torch.nn.functional as F
    from composer.models import ComposerModel

    class Tiny(ComposerModel):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, 8)
            self.out = torch.nn.Linear(8, vocab)

        def forward(self, batch):
            return self.out(self.emb(batch["input_ids"]))

        def loss(self, outputs, batch):
            return F.cross_entropy(outputs.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    return Tiny()


def _fit(data_dir, tok, max_duration, save_folder, load_path=None, stop_at=None):
    from composer import Trainer
    from composer.core import Callback, Event

    seen: list[list[list[int]]] = []

    class Record(Callback):
        def run_event(self, event, state, logger):
            if event == Event.AFTER_DATALOADER:
                b = state.batch
                seen.append(torch.where(b["labels"] != -100, b["labels"], b["input_ids"]).tolist())
            if event == Event.BATCH_START and stop_at is not None and int(state.timestamp.batch) == stop_at:
                raise _Interrupt  # a crash after the checkpoint at `stop_at` batches

    spec = _loader(
        tok,
        local=data_dir,
        split="train",
        max_seq_len=24,
        shuffle=True,
        shuffle_seed=7,
        collator={"name": "mlm", "mlm_probability": 0.2},
    )
    trainer = Trainer(
        model=_tiny_model(len(tok)),
        train_dataloader=spec,
        max_duration=max_duration,
        optimizers=None,
        save_folder=str(save_folder),
        save_interval="3ba",
        save_filename="ba{batch}.pt",
        load_path=load_path,
        device="cpu",
        seed=11,
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        callbacks=[Record()],
    )
    try:
        trainer.fit()
    except _Interrupt:
        pass
    finally:
        trainer.close()
    return seen


def test_resume_sees_exactly_the_same_samples(tmp_path, bert_tok):
    # 22 documents, batch 4, drop_last: 5 batches per epoch; 8 batches cross an epoch boundary after resuming.
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in embedded_documents()[:22]))
    data = tmp_path / "data"
    convert(str(src), data, splits="train")
    full = _fit(str(data), bert_tok, "8ba", tmp_path / "full")
    assert len(full) == 8
    crashed = _fit(str(data), bert_tok, "8ba", tmp_path / "crash", stop_at=3)
    assert crashed[:3] == full[:3] and os.path.isfile(tmp_path / "crash" / "ba3.pt")
    resumed = _fit(
        str(data), bert_tok, "8ba", tmp_path / "resume", load_path=str(tmp_path / "crash" / "ba3.pt")
    )
    assert resumed == full[3:]
    assert full[5] != full[0]  # the second epoch is reshuffled: the check is not trivially true


_RANK_SCRIPT = """
import json, sys
from llmfoundry_lite import registry
from llmfoundry_lite.data.tokenizers import hf_tokenizer
tok = hf_tokenizer(sys.argv[1])
block = {"name": "text", "local": sys.argv[2], "split": "train", "max_seq_len": 64, "shuffle": True}
spec = registry.build("dataloaders", block, "train_loader", tokenizer=tok, device_batch_size=4)
json.dump([row for b in spec.dataloader for row in b["input_ids"].tolist()], open(sys.argv[3], "w"))
"""


def test_ranks_get_disjoint_partitions(tmp_path, concat_dir, llama_tokenizer_dir):
    import random
    import subprocess
    import sys

    port = str(random.Random().randrange(20000, 40000))
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        cmd = [
            sys.executable,
            "-c",
            _RANK_SCRIPT,
            llama_tokenizer_dir,
            concat_dir,
            str(tmp_path / f"{rank}.json"),
        ]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    from collections import Counter

    from streaming import StreamingDataset

    ds = StreamingDataset(local=os.path.join(concat_dir, "train"), batch_size=1)
    every = Counter(tuple(ds[i]["tokens"].tolist()) for i in range(len(ds)))  # the corpus repeats some rows
    ranks = [Counter(tuple(r) for r in json.load(open(tmp_path / f"{rank}.json"))) for rank in (0, 1)]
    assert ranks[0] and ranks[1] and ranks[0] != ranks[1]
    assert not (ranks[0] + ranks[1]) - every  # no sample is served to both ranks
    assert ranks[0].total() + ranks[1].total() >= len(ds) - 2 * 4  # and all are used (up to drop_last)
