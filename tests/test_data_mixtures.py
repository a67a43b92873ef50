"""Dataset mixtures (`streams:` on streaming's Stream): per-stream tagging and counts, the library's errors as one
line naming the stream key, validation of every stream folder, one evaluator per eval stream, a 3:1 quickstart
mixture, and sample-exact resumption after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from llmfoundry_lite import registry
from llmfoundry_lite.data.convert import convert
from llmfoundry_lite.data.corpus import embedded_documents
from llmfoundry_lite.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TINY = ROOT / "recipes" / "quickstart" / "llama-tiny.yaml"
ENV = {**os.environ, "WANDB_MODE": "offline"}
ROW = 32


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, llama_tokenizer_dir):
    """The embedded corpus cut in two different sources: `a` (the first third) and `b` (the rest), 32-token rows."""
    root = tmp_path_factory.mktemp("mixture")
    docs = embedded_documents()
    cut = len(docs) // 3
    out = {}
    for name, part in (("a", docs[:cut]), ("b", docs[cut:])):
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        out[name] = str(root / name)
        convert(str(src), out[name], tokenizer=llama_tokenizer_dir, concat_tokens=ROW, num_workers=0)
    return out


def _rows(folder: str) -> set[tuple[int, ...]]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=folder, batch_size=1)
    return {tuple(ds[i]["tokens"].tolist()) for i in range(len(ds))}


def _streams(src, **weights) -> dict:
    return {name: {"local": src[name], "split": "train", **weights.get(name, {})} for name in ("a", "b")}


def _loader(tok, bs=16, **block):
    block = {"name": "text", "max_seq_len": ROW, **block}
    return registry.build("dataloaders", block, "train_loader", tokenizer=tok, device_batch_size=bs)


def test_samples_carry_their_stream_and_the_model_never_sees_it(two_sources, llama_tok):
    streams = _streams(two_sources, a={"proportion": 3}, b={"proportion": 1})
    spec = _loader(llama_tok, streams=streams, shuffle=True)
    rows = {name: _rows(os.path.join(two_sources[name], "train")) for name in ("a", "b")}
    tally = spec.dataloader.stream_tally
    assert tally.names == ["a", "b"]
    seen = np.zeros(2, np.int64)
    for i, batch in enumerate(spec.dataloader):
        ids = batch["stream_id"].tolist()
        # The tag is right: every row is one of its own stream's rows (the two sources share none).
        for row, sid in zip(batch["input_ids"].tolist(), ids):
            assert tuple(row) in rows["ab"[sid]]
        batch = spec.batch_transforms(batch)  # what Composer calls before the model sees the batch
        assert "stream_id" not in batch
        samples, tokens = tally.last
        assert samples.tolist() == [ids.count(0), ids.count(1)] and tokens.tolist() == [
            ROW * n for n in samples
        ]
        seen += samples
        if i == 49:
            break
    # 3:1 although `b` has more than twice as many rows as `a` (its natural share would be ~0.69).
    assert abs(seen[0] / seen.sum() - 0.75) <= 0.05, seen
    sizes = [len(rows["a"]), len(rows["b"])]
    assert sizes[1] > 2 * sizes[0]


def test_worker_processes_tag_the_same_streams(two_sources, llama_tok):
    """The tag travels from the worker processes (the recipes use num_workers: 8) with each batch."""
    streams = _streams(two_sources, a={"proportion": 3}, b={"proportion": 1})

    def first_batches(workers: int) -> list:
        spec = _loader(llama_tok, streams=streams, shuffle=True, num_workers=workers)
        out = []
        for i, batch in enumerate(spec.dataloader):
            out.append((batch["stream_id"].tolist(), batch["input_ids"].tolist()))
            if i == 4:
                return out

    assert first_batches(2) == first_batches(0)


@pytest.mark.parametrize(
    "weights, extra, key, match",
    [
        ({"a": {"proportion": 3}, "b": {"repeat": 1}}, {}, "streams.b.repeat", "incompatible"),
        ({"a": {"proportion": -1}}, {}, "streams.a.proportion", "non-negative"),
        ({"a": {"proportion": "lots"}}, {}, "streams.a.proportion", "must be a number"),
        ({"a": {"proportion": 1, "choose": 5}}, {}, "streams.a.proportion", "At most one"),
        ({"a": {"repeat": 2}}, {"epoch_size": 100}, "epoch_size", "relative weights only"),
        ({"a": {"split": "test"}}, {}, "streams.a.split", "split 'test' not found"),
        ({"a": {"local": "no-such-folder"}}, {}, "streams.a.local", "does not exist"),
        ({"a": {"shuffle": True}}, {}, "streams.a.shuffle", "allowed keys"),
        ({}, {"local": "x"}, "local", "`streams:` names every folder"),
    ],
)
def test_mistakes_are_one_line_naming_the_stream_key(two_sources, llama_tok, weights, extra, key, match):
    with pytest.raises(RecipeError, match=match) as e:
        _loader(llama_tok, streams=_streams(two_sources, **weights), **extra)
    assert e.value.key == f"train_loader.{key}" and "\n" not in str(e.value)


def test_absolute_weights_follow_streaming(two_sources, llama_tok):
    spec = _loader(llama_tok, streams=_streams(two_sources, a={"repeat": 2}, b={"choose": 100}))
    from streaming import StreamingDataset

    # Rows counted, not distinct rows (_rows is a set: some Pythons' corpus has two equal 32-token rows).
    a = len(StreamingDataset(local=os.path.join(two_sources["a"], "train"), batch_size=1))
    assert spec.dataloader.dataset.epoch_size == 2 * a + 100


def _recipe(tmp_path: Path, tokenizer: str, src: dict, **extra) -> Path:
    """A tiny LLaMA on the two sources, 3:1, each scored by its own evaluator."""
    text = textwrap.dedent(
        f"""
        base: {LLAMA_TINY}
        variables: {{tokenizer_path: {tokenizer}}}
        run_name: mix
        max_seq_len: {ROW}
        model: {{d_model: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1}}
        train_loader:
          local: null
          split: null
          streams:
            a: {{local: {src["a"]}, split: train, proportion: 3}}
            b: {{local: {src["b"]}, split: train, proportion: 1}}
        eval_loader:
          local: null
          split: null
          streams:
            a: {{local: {src["a"]}, split: val}}
            b: {{local: {src["b"]}, split: val}}
        save_folder: {tmp_path}/runs/{{run_name}}
        callbacks: {{generate: {{interval: 1000ba}}}}
        """
    )
    settings = {
        "global_train_batch_size": 16,
        "device_train_microbatch_size": 16,
        "device_eval_batch_size": 16,
        "eval_subset_num_batches": 1,
        "console_log_interval": "10ba",
        **extra,
    }
    text += "".join(f"{k}: {v}\n" for k, v in settings.items())
    path = tmp_path / "mix.yaml"
    path.write_text(text)
    return path


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if '"step"' in line]


def test_validate_checks_every_stream_folder(tmp_path, two_sources, llama_tokenizer_dir):
    from llmfoundry_lite.recipe import load_recipe

    recipe = _recipe(tmp_path, llama_tokenizer_dir, two_sources)
    load_recipe(str(recipe), check_resources=True)
    with pytest.raises(RecipeError, match="does not exist") as e:
        load_recipe(str(recipe), [f"train_loader.streams.b.local={tmp_path}/nothing"], check_resources=True)
    assert e.value.key == "train_loader.streams.b.local"
    convert("embedded", tmp_path / "b", splits="train", max_docs=40)  # raw text, no val split
    with pytest.raises(RecipeError, match="split 'val' not found") as e:
        load_recipe(str(recipe), [f"eval_loader.streams.b.local={tmp_path}/b"], check_resources=True)
    assert e.value.key == "eval_loader.streams.b.split"
    # Raw text next to token rows: one layout per mixture.
    with pytest.raises(RecipeError, match="differ in layout .*a: 32-token rows, b: raw text") as e:
        load_recipe(str(recipe), [f"train_loader.streams.b.local={tmp_path}/b"], check_resources=True)
    assert e.value.key == "train_loader.streams"
    no_b_proportion = ["train_loader.streams.b.proportion=null"]
    with pytest.raises(RecipeError, match="incompatible") as e:  # streaming's rule, before any run starts
        load_recipe(str(recipe), [*no_b_proportion, "train_loader.streams.b.repeat=2"], check_resources=True)
    assert e.value.key == "train_loader.streams.b.repeat"
    with pytest.raises(RecipeError, match="a whole number") as e:
        load_recipe(
            str(recipe), [*no_b_proportion, "train_loader.streams.b.choose=2.5"], check_resources=True
        )
    assert e.value.key == "train_loader.streams.b.choose"
    with pytest.raises(RecipeError, match="read whole") as e:
        load_recipe(str(recipe), ["eval_loader.streams.a.proportion=1"], check_resources=True)
    assert e.value.key == "eval_loader.streams.a.proportion"


def test_quickstart_mixture_draws_3_to_1_and_logs_per_stream(tmp_path, two_sources, llama_tokenizer_dir):
    recipe = _recipe(tmp_path, llama_tokenizer_dir, two_sources, max_duration="50ba", eval_interval="25ba")
    run = subprocess.run(
        [sys.executable, "-m", "llmfoundry_lite.cli", "train", str(recipe)],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records = _metrics(tmp_path / "runs" / "mix" / "metrics.jsonl")
    last = {}
    for r in records:
        last.update(r)
    a, b = last["data/a/samples"], last["data/b/samples"]
    assert a + b == 50 * 16  # every sample counted once, in the stream it came from
    assert abs(a / (a + b) - 0.75) <= 0.05, (a, b)
    assert (last["data/a/tokens"], last["data/b/tokens"]) == (a * ROW, b * ROW)
    # One evaluator per stream, each logged under its own label.
    for name in ("a", "b"):
        assert np.isfinite(last[f"metrics/eval/{name}/LanguageCrossEntropy"])
    assert "metrics/eval/LanguageCrossEntropy" not in last
    # The console prints one eval line per stream, each with that stream's metrics only.
    eval_lines = [line for line in run.stdout.splitlines() if line.startswith("[eval")]
    assert len(eval_lines) == 4, run.stdout[-3000:]  # 2 evals x 2 streams
    for line, name in zip(eval_lines, ("a", "b", "a", "b")):
        assert f"eval/{name}/" in line and f"eval/{'b' if name == 'a' else 'a'}/" not in line, line


# Test-only entry point with the kill_once and record_rows callbacks (run as a script).
KILL_DRIVER = Path(__file__).resolve().parent / "_kill_driver.py"


def test_sigkill_then_rerun_continues_the_exact_mixture(tmp_path, two_sources, llama_tokenizer_dir):
    recipe = _recipe(
        tmp_path,
        llama_tokenizer_dir,
        two_sources,
        max_duration="6ba",
        eval_interval="3ba",
        save_interval="2ba",
        save_num_checkpoints_to_keep=-1,
        deterministic="true",
    )
    driver = KILL_DRIVER

    def run(name: str, kill: bool):
        cmd = [sys.executable, str(driver), str(recipe), f"run_name={name}"]
        cmd.append(f"callbacks.record_rows.path={tmp_path / name}.rows")
        if kill:
            cmd += ["callbacks.kill_once.batch=3", f"callbacks.kill_once.marker={tmp_path / 'killed'}"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)

    whole = run("whole", kill=False)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = run("crashy", kill=True)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = run("crashy", kill=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming run crashy from batch 2 (" in second.stdout

    def rows(name):
        return [json.loads(line) for line in (tmp_path / f"{name}.rows").read_text().splitlines()]

    reference, crashy = rows("whole"), rows("crashy")
    assert [r["batch"] for r in reference] == [1, 2, 3, 4, 5, 6]
    assert [r["batch"] for r in crashy] == [1, 2, 3, 3, 4, 5, 6]  # batch 3 again, from the batch-2 checkpoint
    assert crashy[:3] == reference[:3] and crashy[3:] == reference[2:]

    def last_counts(name):
        last = {}
        for r in _metrics(tmp_path / "runs" / name / "metrics.jsonl"):
            last.update(r)
        return {k: v for k, v in last.items() if k.startswith("data/")}, last

    counts, whole_last = last_counts("whole")
    resumed_counts, crashy_last = last_counts("crashy")
    assert counts == resumed_counts and counts["data/a/samples"] + counts["data/b/samples"] == 6 * 16

    # Same samples in the same order: the same losses and, bit for bit, the same weights.
    def losses(name):  # step -> loss; the resumed run's batch 3 replaces the killed run's
        records = _metrics(tmp_path / "runs" / name / "metrics.jsonl")
        return {r["step"]: r["loss/train/total"] for r in records if "loss/train/total" in r}

    assert losses("whole") == losses("crashy") and len(losses("whole")) == 6
    assert (
        whole_last["metrics/eval/b/LanguageCrossEntropy"]
        == crashy_last["metrics/eval/b/LanguageCrossEntropy"]
    )
    w, c = (_tensors(tmp_path / "runs" / n / "ep0-ba6-rank0.pt") for n in ("whole", "crashy"))
    assert w.keys() == c.keys() and all(torch.equal(w[k], c[k]) for k in w)


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)

    walk("", torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]["model"])
    return out


def test_two_processes_log_the_counts_of_all_ranks(tmp_path, two_sources, llama_tokenizer_dir):
    """Each rank draws its share of every global batch; the logged counts are summed over ranks, so a 2-process run
    logs exactly what one process drawing the same global batches logs."""
    recipe = _recipe(
        tmp_path,
        llama_tokenizer_dir,
        two_sources,
        max_duration="6ba",
        eval_interval="6ba",
        device_train_microbatch_size=8,
        device_eval_batch_size=8,
    )
    counts = {}
    for nproc in (1, 2):
        cmd = [sys.executable, "-m", "llmfoundry_lite.cli", "train", str(recipe), "--nproc", str(nproc)]
        run = subprocess.run(
            [*cmd, f"run_name=p{nproc}"], capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        last = {}
        for r in _metrics(tmp_path / "runs" / f"p{nproc}" / "metrics.jsonl"):
            last.update(r)
        counts[nproc] = {k: v for k, v in last.items() if k.startswith("data/")}
    assert counts[1] == counts[2] and counts[2]["data/a/samples"] + counts[2]["data/b/samples"] == 6 * 16


@pytest.mark.parametrize(
    "weights",
    [{"a": {"proportion": 3}, "b": {"proportion": 1}}, {"a": {"repeat": 2}, "b": {"choose": 100}}],
)
def test_estimate_counts_a_mixture_epoch_as_streaming_draws_it(tmp_path, two_sources, llama_tok, weights):
    """`max_duration: 1ep` of a mixture: estimate's epoch is the one streaming's dataset draws."""
    from omegaconf import OmegaConf

    from llmfoundry_lite.apps.estimate import samples_in_split

    spec = _loader(llama_tok, streams=_streams(two_sources, **weights))
    cfg = OmegaConf.create({"train_loader": {"name": "text", "streams": _streams(two_sources, **weights)}})
    assert samples_in_split(cfg) == spec.dataloader.dataset.epoch_size
