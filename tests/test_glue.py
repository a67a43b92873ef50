"""GLUE finetuning: metrics, scoring convention, recipe parsing and errors, and real end-to-end finetuning runs
of a tiny MosaicBERT through Composer on local GLUE-schema data (written from the embedded corpus)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from llmfoundry_lite.apps.glue.config import TASKS, Job, load_glue_recipe, parse_glue_section, plan_jobs
from llmfoundry_lite.apps.glue.data import load_task_splits, make_toy_glue
from llmfoundry_lite.apps.glue.model import GlueClassifier, build_encoder, check_starting_weights, glue_metric
from llmfoundry_lite.apps.glue.orchestrate import _run_parallel
from llmfoundry_lite.apps.glue.results import results_markdown, summarize
from llmfoundry_lite.checkpoints import load_model_state
from llmfoundry_lite.cli import main
from llmfoundry_lite.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "glue" / "tiny.yaml")
BASE = ROOT / "recipes" / "glue" / "mosaicbert-base.yaml"


@pytest.fixture
def tiny_overrides(tmp_path, bert_tokenizer_dir):
    """Overrides making recipes/glue/tiny.yaml as small as possible (tokenizer, model shape, data)."""
    return [
        f"variables.tokenizer_path={bert_tokenizer_dir}",
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.intermediate_size=64",
        f"glue.data_dir={tmp_path / 'toy'}",
        "glue.max_seq_len=32",
        "glue.max_train_samples=32",
        f"glue.dataset_cache_dir={tmp_path / 'hf-cache'}",
    ]


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def _score(name, num_labels, preds, target, batches=2):
    """``glue_metric(name)`` fed ``preds``/``target`` in ``batches`` pieces, as Composer feeds an evaluation."""
    m = glue_metric(name, num_labels)
    for p, t in zip(torch.tensor_split(preds, batches), torch.tensor_split(target, batches)):
        m.update(p, t)
    return float(m.compute())


def test_metrics_on_hand_examples():
    preds = torch.tensor([1, 1, 0, 0, 1, 0])
    target = torch.tensor([1, 0, 0, 1, 1, 0])
    # tp=2 fp=1 fn=1 tn=2
    assert _score("accuracy", 2, preds, target) == pytest.approx(4 / 6)
    assert _score("f1", 2, preds, target) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert _score("matthews", 2, preds, target) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert _score("matthews", 2, target, target) == pytest.approx(1.0)
    assert _score("matthews", 2, 1 - target, target) == pytest.approx(-1.0)
    assert _score("matthews", 2, torch.zeros(6, dtype=torch.long), target) == 0.0  # undefined -> 0
    assert _score("f1", 2, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)) == 0.0
    # Accuracy is the fraction of exact matches, not torchmetrics' default mean of per-class recalls.
    three = torch.tensor([0, 0, 0, 0, 1, 2]), torch.tensor([0, 0, 0, 0, 2, 1])
    assert _score("accuracy", 3, *three) == pytest.approx(4 / 6)
    # Spearman with ties: ranks x=[1, 2.5, 2.5, 4], y=[1, 3, 2, 4] -> 4.5 / sqrt(4.5 * 5)
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([0.1, 0.9, 0.5, 7.0])
    assert _score("spearman", 1, x, y) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert _score("spearman", 1, x, -y) == pytest.approx(-4.5 / math.sqrt(4.5 * 5))
    assert _score(
        "pearson", 1, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0]), 1
    ) == pytest.approx(1.0)
    # A collapsed regression head (constant scores): correlation undefined -> 0, not NaN in the GLUE average.
    assert _score("spearman", 1, torch.ones(4), y) == 0.0
    assert _score("pearson", 1, torch.ones(4), y) == 0.0


def test_each_task_scores_with_its_metrics_through_the_classifier():
    """The classifier feeds argmax labels (classification) or fp32 scores (regression, even from bf16 logits) to
    each task's metrics, over several batches; the scores are those of the metric definitions."""
    from torchmetrics.functional import f1_score, matthews_corrcoef, spearman_corrcoef

    reference = {
        "accuracy": lambda p, t: (p == t).double().mean(),
        "f1": lambda p, t: f1_score(p, t, task="binary"),
        "matthews": lambda p, t: matthews_corrcoef(p, t, task="binary"),
        "spearman": spearman_corrcoef,
    }
    g = torch.Generator().manual_seed(0)
    n = 64
    for task in ("mnli", "qqp", "cola", "stsb"):
        spec = TASKS[task]
        clf = GlueClassifier(torch.nn.Identity(), spec.num_labels, spec.metrics, hidden_size=4)
        assert set(clf.get_metrics()) == set(spec.metrics) and clf.get_metrics(is_train=True) == {}
        if spec.num_labels == 1:
            logits = torch.randn(n, 1, generator=g).bfloat16()
            labels, preds = torch.rand(n, generator=g) * 5, logits.squeeze(-1).float()
        else:
            logits = torch.randn(n, spec.num_labels, generator=g)
            labels = torch.randint(0, spec.num_labels, (n,), generator=g)
            preds = logits.argmax(-1)
        for name, metric in clf.get_metrics().items():
            for rows in (slice(0, n // 2), slice(n // 2, n)):
                clf.update_metric({"labels": labels[rows]}, logits[rows], metric)
            expect = float(reference[name](preds, labels))
            assert float(metric.compute()) == pytest.approx(expect, abs=1e-6), (task, name)
    p3, t3 = torch.randint(0, 3, (300,), generator=g), torch.randint(0, 3, (300,), generator=g)
    assert _score("matthews", 3, p3, t3) == pytest.approx(
        float(matthews_corrcoef(p3, t3, task="multiclass", num_classes=3)), abs=1e-6
    )


# ---------------------------------------------------------------------------------------------------------
# Scoring convention and job planning
# ---------------------------------------------------------------------------------------------------------


def _run(task, seed, metrics):
    return {
        "task": task,
        "seed": seed,
        "metrics": metrics,
        "score": sum(metrics.values()) / len(metrics),
        "started_from": "x",
        "seconds": 1.0,
    }


def test_summary_average_is_unweighted_mean_of_task_means():
    runs = [
        _run("mnli", 19, {"mnli_m/accuracy": 80.0, "mnli_mm/accuracy": 82.0}),  # 81
        _run("mrpc", 19, {"mrpc/accuracy": 80.0, "mrpc/f1": 86.0}),  # 83
        _run("mrpc", 8364, {"mrpc/accuracy": 70.0, "mrpc/f1": 76.0}),  # 73 -> task 78
        _run("cola", 19, {"cola/matthews": 50.0}),
        _run("cola", 8364, {"cola/matthews": 60.0}),
        _run("cola", 717, {"cola/matthews": 70.0}),  # task 60
    ]
    s = summarize(runs)
    assert s["tasks"]["mnli"]["score"] == pytest.approx(81.0)
    assert s["tasks"]["mrpc"]["score"] == pytest.approx(78.0)
    assert s["tasks"]["mrpc"]["metrics"]["mrpc/f1"]["mean"] == pytest.approx(81.0)
    assert s["tasks"]["cola"]["score_std"] == pytest.approx(10.0)
    assert s["glue_average"] == pytest.approx((81 + 78 + 60) / 3)
    assert list(s["tasks"]) == ["mnli", "cola", "mrpc"]  # GLUE table order
    md = results_markdown(s, runs)
    # Three of the eight tasks: not GLUE's score, and not labelled as it.
    assert "| **average of 3 tasks (MNLI, COLA, MRPC; not the GLUE average)** | | | **73.00** |" in md
    eight = [
        _run(t, 19, {f"{t}/accuracy": 50.0})
        for t in ("mnli", "qqp", "qnli", "sst2", "cola", "mrpc", "rte", "stsb")
    ]
    assert summarize(eight)["average_label"] == "GLUE average"
    assert "| MRPC | mrpc/accuracy 75.00, mrpc/f1 81.00 | 2 | 78.00 ± 7.07 |" in md


def test_plan_jobs_uses_published_settings_and_seed_options():
    cfg = parse_glue_section({"tasks": {"MNLI": None, "rte": {"lr": 2e-5}, "SST-2": {"seeds": [1, 2]}}})
    jobs = plan_jobs(cfg)
    assert [(j.task, j.seed) for j in jobs] == [("mnli", 19), ("sst2", 1), ("sst2", 2)] + [
        ("rte", s) for s in (19, 8364, 717, 10536, 90166)
    ]
    mnli = jobs[0]
    assert (mnli.lr, mnli.weight_decay, mnli.batch_size, mnli.epochs) == (5e-5, 5e-6, 48, 3)
    assert jobs[-1].lr == 2e-5 and jobs[-1].weight_decay == 1e-5 and jobs[-1].batch_size == 16
    three = plan_jobs(cfg, tasks=["rte", "mnli"], num_seeds=3)
    assert [j.seed for j in three if j.task == "rte"] == [19, 8364, 717]
    mnli_seeds = [j.seed for j in three if j.task == "mnli"]
    assert len(set(mnli_seeds)) == 3 and mnli_seeds[0] == 19
    assert mnli_seeds == [j.seed for j in plan_jobs(cfg, tasks=["mnli"], num_seeds=3)]  # deterministic
    with pytest.raises(RecipeError, match=r"unknown GLUE task 'mnlii' \(did you mean 'mnli'"):
        plan_jobs(cfg, tasks=["mnlii"])
    with pytest.raises(RecipeError, match="glue.tasks.rtee.*did you mean 'rte'"):
        parse_glue_section({"tasks": {"rtee": None}})
    with pytest.raises(RecipeError, match="glue.tasks.rte.lrr.*did you mean 'lr'"):
        parse_glue_section({"tasks": {"rte": {"lrr": 1e-5}}})
    with pytest.raises(RecipeError, match="glue.max_seq_length.*did you mean 'max_seq_len'"):
        parse_glue_section({"max_seq_length": 128})


def test_mosaicbert_base_recipe_has_the_published_settings():
    """The published settings are written once (TASKS and the glue: section's defaults); the recipe uses them."""
    cfg, g = load_glue_recipe(BASE)
    assert cfg.model.name == "mosaic_bert"
    assert g.max_seq_len == 256 and g.betas == [0.9, 0.98] and g.eps == 1e-6 and g.t_warmup == "0.06dur"
    assert g.start_from_mnli == ["rte", "mrpc", "stsb"]
    jobs = plan_jobs(g)
    for j in jobs:
        spec = TASKS[j.task]
        assert (j.lr, j.weight_decay, j.batch_size, j.epochs) == (
            spec.lr,
            spec.weight_decay,
            spec.batch_size,
            spec.epochs,
        )
    assert sorted((j.task, j.seed) for j in jobs) == sorted((t, s) for t in TASKS for s in TASKS[t].seeds)
    # Spot checks against the reference YAML: MNLI's batch of 48, RTE's weight decay equal to its lr, and the
    # number of seeds per task (more for the small, noisy tasks).
    assert (TASKS["mnli"].lr, TASKS["mnli"].batch_size, TASKS["mnli"].epochs) == (5e-5, 48, 3)
    assert TASKS["rte"].weight_decay == TASKS["rte"].lr == 1e-5
    assert {t: sum(j.task == t for j in jobs) for t in TASKS} == {
        "mnli": 1,
        "qqp": 1,
        "qnli": 1,
        "sst2": 3,
        "cola": 4,
        "mrpc": 5,
        "rte": 5,
        "stsb": 5,
    }
    # The published recipe refuses to run without pretrained weights.
    with pytest.raises(RecipeError, match="glue.checkpoint"):
        check_starting_weights(cfg, g)


# ---------------------------------------------------------------------------------------------------------
# Bad input through the CLI (exit code 2, one line naming the key or path)
# ---------------------------------------------------------------------------------------------------------


def test_cli_errors_name_the_key(tiny_overrides, tmp_path, capsys):
    def run(*args):
        code = main(["glue", TINY, *tiny_overrides, *args])
        return code, capsys.readouterr().err

    code, err = run("--tasks", "rte,mnlii")
    assert code == 2 and "unknown GLUE task 'mnlii' (did you mean 'mnli'" in err and "--tasks" in err
    code, err = run("glue.tasks.rtee.lr=1e-5")
    assert code == 2 and "glue.tasks.rtee" in err and "did you mean 'rte'" in err
    code, err = run("glue.make_toy_data=false", f"glue.data_dir={tmp_path / 'nowhere'}")
    assert code == 2 and "glue.data_dir" in err and "nowhere" in err and "does not exist" in err
    (tmp_path / "partial" / "rte").mkdir(parents=True)
    (tmp_path / "partial" / "rte" / "train.jsonl").write_text(
        '{"sentence1": "a", "sentence2": "b", "label": 0}\n'
    )
    code, err = run("glue.make_toy_data=false", f"glue.data_dir={tmp_path / 'partial'}", "--tasks", "rte")
    assert code == 2 and "missing split file" in err and "validation.jsonl" in err
    code, err = run("--checkpoint", str(tmp_path / "missing.pt"))
    assert code == 2 and "glue.checkpoint" in err and "missing.pt" in err and "does not exist" in err
    code, err = run("glue.allow_random_init=false")
    assert code == 2 and "no pretrained weights" in err and "--checkpoint" in err
    assert not (tmp_path / "toy").exists()  # every error came before any data or training


# ---------------------------------------------------------------------------------------------------------
# End to end: real finetuning with Composer
# ---------------------------------------------------------------------------------------------------------


def test_glue_end_to_end_tiny_recipe(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "glue",
            TINY,
            *tiny_overrides,
            "glue.tasks.rte.epochs=1",
            "glue.tasks.stsb.epochs=1",
            "--tasks",
            "mnli,rte,stsb",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "average of 3 tasks (MNLI, STSB, RTE; not the GLUE average)" in printed
    # One line per job as it starts, at each eval and as it finishes; no Composer warnings on the console.
    lines = printed.splitlines()
    assert sum(line.startswith("[glue mnli/seed=19] start: ") for line in lines) == 1
    assert sum(line.startswith("[glue mnli/seed=19] eval at epoch ") for line in lines) == 2
    assert sum(line.startswith("[glue rte/seed=8364] done in ") for line in lines) == 1
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"mnli", "rte", "stsb"}
    runs = res["runs"]
    assert [(r["task"], r["seed"]) for r in runs] == [("mnli", 19), ("stsb", 19), ("rte", 19), ("rte", 8364)]
    mnli = runs[0]
    assert set(mnli["metrics"]) == {"mnli_m/accuracy", "mnli_mm/accuracy"}
    assert len(mnli["history"]) == 2  # evaluated after each of its 2 epochs
    assert mnli["train_rows"] == 32
    # RTE and STS-B started from the MNLI-finetuned checkpoint, a real Composer checkpoint on disk.
    assert Path(mnli["checkpoint"]).is_file()
    assert all(r["started_from"] == mnli["checkpoint"] for r in runs[1:])
    assert set(runs[1]["metrics"]) == {"stsb/spearman"}
    for r in runs:
        for v in r["metrics"].values():
            assert -100.0 <= v <= 100.0 and math.isfinite(v)
    # The average follows the convention from the per-run numbers.
    rte = (runs[2]["metrics"]["rte/accuracy"] + runs[3]["metrics"]["rte/accuracy"]) / 2
    expect = (
        (mnli["metrics"]["mnli_m/accuracy"] + mnli["metrics"]["mnli_mm/accuracy"]) / 2
        + runs[1]["metrics"]["stsb/spearman"]
        + rte
    ) / 3
    assert res["glue_average"] == pytest.approx(expect)
    md = (out / "results.md").read_text()
    assert f"**{res['glue_average']:.2f}**" in md and "| RTE |" in md
    # The toy data was written in the GLUE schema (MNLI has matched and mismatched validation splits).
    first = json.loads(
        (tmp_path / "toy" / "mnli" / "validation_mismatched.jsonl").read_text().splitlines()[0]
    )
    assert set(first) == {"premise", "hypothesis", "label"}
    # A later run can start RTE from this run's MNLI checkpoint without rerunning MNLI.
    again = tmp_path / "again"
    code = main(
        [
            "glue",
            TINY,
            *tiny_overrides,
            "glue.tasks.rte.epochs=1",
            f"glue.mnli_checkpoint={mnli['checkpoint']}",
            "--tasks",
            "rte",
            "--seeds",
            "1",
            "--out",
            str(again),
        ]
    )
    assert code == 0
    [rerun] = json.loads((again / "results.json").read_text())["runs"]
    assert rerun["started_from"] == str(Path(mnli["checkpoint"]).resolve())
    # Finetuning changed the encoder: the MNLI checkpoint's encoder differs from the model it started from.
    ckpt = load_model_state(mnli["checkpoint"])
    cfg, g = load_glue_recipe(TINY, tiny_overrides)
    torch.manual_seed(19)
    enc, _ = build_encoder(cfg, g)
    assert any(not torch.equal(v, ckpt[f"encoder.{k}"]) for k, v in enc.state_dict().items())


def test_finetune_from_pretraining_checkpoint(tiny_overrides, tmp_path, bert_tokenizer_dir):
    """A Composer checkpoint saved by a pretraining Trainer is loaded into the encoder, then finetuned."""
    from composer import Trainer
    from composer.optim import DecoupledAdamW
    from torch.utils.data import DataLoader

    from llmfoundry_lite import registry
    from llmfoundry_lite.data.corpus import embedded_documents
    from llmfoundry_lite.train.build import build_model, build_tokenizer

    cfg, g = load_glue_recipe(TINY, tiny_overrides)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok)
    collator = registry.build(
        "collators", {"name": "mlm", "mlm_probability": 0.3}, "c", tokenizer=tok, max_seq_len=32
    )
    texts = [{"text": d[:300]} for d in embedded_documents()[:16]]
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(texts, batch_size=8, collate_fn=collator),
        max_duration="2ba",
        optimizers=DecoupledAdamW(model.parameters(), lr=1e-2),
        save_folder=str(tmp_path / "pretrain"),
        save_interval="2ba",
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
    )
    trainer.fit()
    trainer.close()
    trained = {k: v.clone() for k, v in model.encoder.state_dict().items()}

    # A save folder resolves to its latest checkpoint; the encoder gets exactly the trained weights.
    g.checkpoint = str(tmp_path / "pretrain")
    enc, _ = build_encoder(cfg, g)
    assert all(torch.equal(v, trained[k]) for k, v in enc.state_dict().items())

    # A checkpoint of another shape is refused with a message naming the key.
    cfg_big, g_big = load_glue_recipe(TINY, [*tiny_overrides, "model.d_model=64"])
    g_big.checkpoint = g.checkpoint
    with pytest.raises(RecipeError, match="glue.checkpoint.*shape"):
        build_encoder(cfg_big, g_big)

    # And it finetunes from there (CLI --checkpoint).
    out = tmp_path / "out"
    code = main(
        [
            "glue",
            TINY,
            *tiny_overrides,
            "glue.tasks.sst2.epochs=1",
            "--tasks",
            "sst2",
            "--checkpoint",
            str(tmp_path / "pretrain"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["runs"][0]["started_from"] == str(tmp_path / "pretrain")
    assert res["glue_average"] == pytest.approx(res["runs"][0]["metrics"]["sst2/accuracy"])


def test_local_csv_and_tsv_files_load_through_datasets(tmp_path):
    folder = tmp_path / "data" / "CoLA"  # GLUE's own folder spelling is accepted
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("sentence,label\nthe cat sat,1\ncat the sat,0\n")
    (folder / "validation.tsv").write_text("sentence\tlabel\nthe dog ran\t1\n")
    splits = load_task_splits("cola", str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert splits["train"]["sentence"] == ["the cat sat", "cat the sat"] and splits["validation"][
        "label"
    ] == [1]
    (folder / "validation.tsv").write_text("text\tlabel\nthe dog ran\t1\n")
    with pytest.raises(RecipeError, match="lacks column.*sentence"):
        load_task_splits("cola", str(tmp_path / "data"), cache_dir=str(tmp_path / "cache2"))


def _spec(tmp_path, task, **kw):
    job = Job(task=task, seed=7, lr=1e-3, weight_decay=0.0, batch_size=8, epochs=1)
    return {
        "job": dataclasses.asdict(job),
        "job_dir": str(tmp_path / "out" / job.name),
        "init_checkpoint": None,
        "wait_for_mnli": False,
        "save_checkpoint": False,
        **kw,
    }


def test_parallel_worker_runs_a_job_in_a_subprocess(tiny_overrides, tmp_path):
    """The multi-GPU path on CPU: a job runs in `python -m llmfoundry_lite.apps.glue SPEC.json` and reports back."""
    make_toy_glue(tmp_path / "toy", ["rte"], rows=16, eval_rows=8)
    [res] = _run_parallel(TINY, [*tiny_overrides, "glue.device=cpu"], [_spec(tmp_path, "rte")], n_gpus=1)
    assert res["task"] == "rte" and res["seed"] == 7 and res["train_rows"] == 16
    assert set(res["metrics"]) == {"rte/accuracy"}
    assert (tmp_path / "out" / "rte" / "seed=7" / "log.txt").exists()


@pytest.mark.slow
def test_parallel_workers_wait_for_mnli(tiny_overrides, tmp_path):
    """With two slots, the RTE job (which starts from MNLI) is launched only once MNLI wrote its checkpoint."""
    make_toy_glue(tmp_path / "toy", ["mnli", "rte"], rows=16, eval_rows=8)
    specs = [_spec(tmp_path, "mnli", save_checkpoint=True), _spec(tmp_path, "rte", wait_for_mnli=True)]
    runs = _run_parallel(TINY, [*tiny_overrides, "glue.device=cpu"], specs, n_gpus=2)
    mnli, rte = sorted(runs, key=lambda r: r["task"])
    assert set(mnli["metrics"]) == {"mnli_m/accuracy", "mnli_mm/accuracy"}
    assert Path(mnli["checkpoint"]).is_file() and rte["started_from"] == mnli["checkpoint"]


def _processes_running(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker`` (Linux /proc)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if marker in cmdline and "zombie" not in state:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_parallel_failure_stops_the_other_jobs(tiny_overrides, tmp_path):
    """When one worker fails, the error names the job and shows its log, and the other workers are stopped."""
    make_toy_glue(tmp_path / "toy", ["rte"], rows=16, eval_rows=8)
    overrides = [*tiny_overrides, "glue.device=cpu", "glue.make_toy_data=false"]
    long_rte = _spec(tmp_path, "rte", job={**_spec(tmp_path, "rte")["job"], "epochs": 100000})
    no_data = _spec(tmp_path, "cola")  # the toy data has no CoLA: this worker fails at once
    with pytest.raises(RuntimeError, match=r"(?s)GLUE job cola seed 7 failed.*no folder for task 'cola'"):
        _run_parallel(TINY, overrides, [long_rte, no_data], n_gpus=2)
    assert _processes_running(str(tmp_path / "out" / "rte")) == []
    assert not (tmp_path / "out" / "rte" / "seed=7" / "result.json").exists()


GLUE_ONLY = """
variables:
  tokenizer_path: {tok}
tokenizer: {{name: hf, path: "${{variables.tokenizer_path}}"}}
model: {{name: mosaic_bert, d_model: 32, n_layers: 1, n_heads: 2, intermediate_size: 64}}
glue:
  allow_random_init: true
  data_dir: {data}
  make_toy_data: true
  max_seq_len: 32
  max_train_samples: 32
  dataset_cache_dir: {cache}
  tasks:
    rte: {{lr: 1.0e-3, batch_size: 16, epochs: 1, seeds: [19]}}
"""


def test_glue_recipe_needs_no_pretraining_keys(tmp_path, bert_tokenizer_dir, capsys):
    """A GLUE recipe of model, tokenizer and glue: only finetunes; a pretraining key in it is named, not ignored."""
    recipe = tmp_path / "glue-only.yaml"
    recipe.write_text(
        GLUE_ONLY.format(tok=bert_tokenizer_dir, data=tmp_path / "toy", cache=tmp_path / "hf-cache")
    )
    assert main(["glue", str(recipe), "--out", str(tmp_path / "out")]) == 0
    [run] = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run["task"] == "rte" and set(run["metrics"]) == {"rte/accuracy"}
    capsys.readouterr()

    def error(*overrides):
        assert main(["glue", str(recipe), *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    err = error("optimizer.lr=1e-3")
    assert "optimizer" in err and "finetuning does not read" in err and "glue.tasks.<task>.lr" in err
    assert "train_loader" in err  # what a whole pretraining recipe would still need
    assert "did you mean 'model'" in error("modle.d_model=32")
    assert "model.d_modle" in error("model.d_modle=32")
    assert "missing required key 'tokenizer'" in error("tokenizer=null")
    # `validate` and `show` take the same recipe (and refuse the same mistakes).
    assert main(["validate", str(recipe)]) == 0
    assert main(["show", str(recipe)]) == 0
    assert "# parameters:" in capsys.readouterr().out
    assert main(["validate", str(recipe), "optimizer.lr=1e-3"]) == 2
    assert "finetuning does not read" in capsys.readouterr().err


def test_init_from_hf_encoder(tiny_overrides, tmp_path, bert_tokenizer_dir):
    """glue.init_from_hf finetunes a Hugging Face BERT (saved locally by transformers) via BertEncoder.from_hf."""
    import transformers

    hf_cfg = transformers.BertConfig(
        vocab_size=2048,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(hf_cfg).save_pretrained(tmp_path / "hf-bert")
    cfg, g = load_glue_recipe(TINY, [*tiny_overrides, f"glue.init_from_hf={tmp_path / 'hf-bert'}"])
    check_starting_weights(cfg, g)
    enc, tok = build_encoder(cfg, g)
    clf = GlueClassifier(enc, 3, ("accuracy",))
    assert clf.pooler.in_features == 32
    batch = tok(["a cat", "the dog sat down"], ["sat", "ran"], padding=True, return_tensors="pt")
    clf.eval()
    logits = clf(dict(batch))
    assert logits.shape == (2, 3)
    with pytest.raises(RecipeError, match="either checkpoint or init_from_hf"):
        load_glue_recipe(TINY, [*tiny_overrides, "glue.init_from_hf=x", "glue.checkpoint=y"])


def test_model_surgery_algorithms_are_replayed_before_loading(tiny_overrides, tmp_path):
    """HF BERT pretrained with Composer's ALiBi and gated-linear-units surgery (the recipe-composition route to
    the Mosaic architecture): GLUE replays the recipe's surgery so the checkpoint loads, then finetunes it."""
    from composer import Trainer
    from torch.utils.data import DataLoader

    from llmfoundry_lite import registry
    from llmfoundry_lite.train.build import build_model, build_multi, build_tokenizer

    hf = [*tiny_overrides, "model.name=hf_bert", "model.max_position_embeddings=64"]
    surgery = ["+algorithms.alibi.max_sequence_length=64", "+algorithms.gated_linear_units={}"]
    cfg, g = load_glue_recipe(TINY, [*hf, *surgery])
    tok = build_tokenizer(cfg)
    model = build_model(cfg, tok)
    collator = registry.build("collators", {"name": "mlm"}, "c", tokenizer=tok, max_seq_len=16)
    loader = DataLoader([{"text": "a b c d e"}] * 4, batch_size=4, collate_fn=collator)
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration="1ba",
        algorithms=build_multi(cfg, "algorithms"),
        save_folder=str(tmp_path / "ck"),
        save_interval="1ba",
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
    )
    trainer.fit()
    trainer.close()
    trained = {k: v.clone() for k, v in model.model.bert.state_dict().items()}
    assert any("gated_layer" in k for k in trained)  # the surgery really changed the structure

    g.checkpoint = str(tmp_path / "ck")
    enc, _ = build_encoder(cfg, g)
    assert {k: v for k, v in enc.base.state_dict().items()}.keys() == trained.keys()
    assert all(torch.equal(v, trained[k]) for k, v in enc.base.state_dict().items())
    # Without the recipe's algorithms the model has another structure: a clear error, not a silent partial load.
    cfg_plain, g_plain = load_glue_recipe(TINY, hf)
    g_plain.checkpoint = g.checkpoint
    with pytest.raises(RecipeError, match=r"glue.checkpoint.*model-surgery algorithms"):
        build_encoder(cfg_plain, g_plain)
    out = tmp_path / "out"
    code = main(
        [
            "glue",
            TINY,
            *hf,
            *surgery,
            "glue.tasks.rte.epochs=1",
            "--tasks",
            "rte",
            "--seeds",
            "1",
            "--checkpoint",
            g.checkpoint,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert set(json.loads((out / "results.json").read_text())["runs"][0]["metrics"]) == {"rte/accuracy"}


@pytest.mark.parametrize("debug", ["", "1"])
def test_unactionable_composer_warnings_hidden_unless_debug(monkeypatch, debug):
    import warnings

    from llmfoundry_lite.quiet import DEBUG_ENV, quiet_dependency_warnings

    monkeypatch.setenv(DEBUG_ENV, debug)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_dependency_warnings()
        warnings.warn("Cannot split tensor of length 16 into batches of size 32.", UserWarning, stacklevel=1)
        warnings.warn("The warmup duration is 0. If you specified warmup ...", UserWarning, stacklevel=1)
        warnings.warn("something the user should see", UserWarning, stacklevel=1)
    shown = [str(w.message) for w in seen]
    assert "something the user should see" in shown
    assert len(shown) == (3 if debug else 1)
