"""`llmfoundry-lite eval` and the `lm_eval` callback on lm-evaluation-harness, offline.

A tiny multiple-choice task and a tiny LAMBADA-style task (tests/fixtures/lm_eval: lm-eval task YAMLs over local
JSONL files) score a quickstart LLaMA trained for a few batches; the accuracies must equal the ones computed
here directly with the model: argmax over the choices' summed log-likelihoods, and "is the last word the greedy
continuation". After 4 batches the model predicts no LAMBADA word, so the adapter test also scores continuations
the model does predict, for the True side of `greedy`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
QUICK_LLAMA = str(REPO / "recipes/quickstart/llama-tiny.yaml")
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lm_eval"
TASKS = "tiny_mc,tiny_lambada"
CALLBACK_LIMIT = 6
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_tokenizer_dir, causal_mds_dir):
    """(tasks folder, run folder): the quickstart LLaMA, shrunk, trained 4 batches with the lm_eval callback.

    The task YAMLs name their data files relative to the working directory, so runs work in a copy of them.
    """
    root = tmp_path_factory.mktemp("eval")
    tasks = root / "tasks"
    shutil.copytree(FIXTURES, tasks)
    run = root / "run"
    overrides = {
        "variables.tokenizer_path": llama_tokenizer_dir,
        "variables.data_local": causal_mds_dir,
        "run_name": "eval-tiny",
        "model.d_model": 64,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "max_duration": "4ba",
        "global_train_batch_size": 8,
        "device_train_microbatch_size": 8,
        "device_eval_batch_size": 8,
        "eval_interval": "4ba",
        "eval_subset_num_batches": 1,
        "save_interval": "4ba",
        "save_folder": str(run),
        "callbacks.generate.interval": "100ba",
        "callbacks.generate.max_new_tokens": 2,
        "callbacks.lm_eval.tasks": f"[{TASKS}]",
        "callbacks.lm_eval.interval": "2ba",
        "callbacks.lm_eval.limit": CALLBACK_LIMIT,
        "callbacks.lm_eval.include_path": str(tasks),
        "callbacks.lm_eval.batch_size": 4,
    }
    cmd = [sys.executable, "-m", "llmfoundry_lite.cli", "train", QUICK_LLAMA]
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    done = subprocess.run(cmd, cwd=tasks, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tasks, run, done.stdout


def _docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def _load_model(checkpoint: Path):
    """The checkpoint's decoder, rebuilt here from the config it carries (not through the code under test)."""
    from llmfoundry_lite.models.llama import ComposerLlama, LlamaConfig

    sd = torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]["model"]
    model = ComposerLlama(LlamaConfig(**sd["_extra_state"]["config"]))
    model.model.load_state_dict({k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")})
    return model.eval()


def _score(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """(log p(continuation | context), greedy?) with one unpadded forward, as lm-eval defines them."""
    ctx = tok(context)["input_ids"]  # BOS + context
    whole = tok(context + continuation)["input_ids"]
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits = model({"input_ids": torch.tensor([whole[:-1]])})[0]
    logp = F.log_softmax(logits[len(ctx) - 1 :].float(), dim=-1)
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def _expected(model, tok, limit: int | None = None) -> dict[str, float]:
    """eval/<task>/<metric> computed directly: argmax of summed log-likelihoods; greedy last word."""
    mc = _docs("tiny_mc.jsonl")[:limit]
    acc = acc_norm = 0
    for doc in mc:
        lls = [_score(model, tok, doc["question"], " " + c)[0] for c in doc["choices"]]
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"])]  # lm-eval's acc_norm: per character
        acc += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == doc["answer"]
    lam = _docs("tiny_lambada.jsonl")[:limit]
    greedy = 0
    for doc in lam:
        words = doc["text"].split(" ")
        greedy += _score(model, tok, " ".join(words[:-1]), " " + words[-1])[1]
    return {
        "eval/tiny_mc/acc": acc / len(mc),
        "eval/tiny_mc/acc_norm": acc_norm / len(mc),
        "eval/tiny_lambada/acc": greedy / len(lam),
    }


def _checkpoint(run: Path) -> Path:
    return (run / "latest-rank0.pt").resolve()


def test_adapter_loglikelihoods_equal_unbatched_forward(trained, llama_tok):
    """Batched, right-padded, sorted requests give each (context, continuation) its own log-likelihood."""
    from lm_eval.api.instance import Instance

    from llmfoundry_lite.apps.evaluate.adapter import DecoderLM

    _, run, _ = trained
    model = _load_model(_checkpoint(run))
    pairs = [(d["question"], " " + c) for d in _docs("tiny_mc.jsonl") for c in d["choices"]]
    pairs += [("", " The object")]  # empty context: conditioned on BOS alone
    # Continuations the model predicts itself, so that `greedy` is True for some.
    for doc in _docs("tiny_mc.jsonl"):
        with torch.no_grad():
            nxt = model({"input_ids": torch.tensor([llama_tok(doc["question"])["input_ids"]])})[
                0, -1
            ].argmax()
        pairs.append((doc["question"], llama_tok.decode([int(nxt)])))
    lm = DecoderLM(model, llama_tok, batch_size=5)  # 49 requests of mixed lengths: padding in every batch
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ref_ll, ref_greedy = (
            _score(model, llama_tok, ctx, cont) if ctx else _score_empty(model, llama_tok, cont)
        )
        assert abs(ll - ref_ll) <= 1e-4 and greedy == ref_greedy, (ctx, cont, ll, ref_ll)
    # Rolling log-likelihood of a text = its tokens scored after BOS, in windows of max_seq_len.
    text = " ".join(_docs("tiny_lambada.jsonl")[0]["text"] for _ in range(12))  # > 128 tokens: two windows
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = llama_tok(text)["input_ids"]  # BOS first
    tail = len(ids) - 1 - 128  # tokens left after the first window, scored with the fullest context that fits
    assert model.cfg.max_seq_len == 128 and 0 < tail <= 128, len(ids)
    with torch.no_grad():
        first = F.log_softmax(model({"input_ids": torch.tensor([ids[:128]])})[0].float(), -1)
        rest = F.log_softmax(model({"input_ids": torch.tensor([ids[-129:-1]])})[0].float(), -1)
    ref = first.gather(1, torch.tensor(ids[1:129])[:, None]).sum()
    ref += rest[-tail:].gather(1, torch.tensor(ids[-tail:])[:, None]).sum()
    assert abs(rolling - float(ref)) <= 1e-3, (rolling, float(ref))
    # Greedy generation stops at the stop string.
    (text_out,) = lm.generate_until(
        [Instance("generate_until", {}, ("The object of", {"until": ["\n"], "max_gen_toks": 20}), 0)]
    )
    assert "\n" not in text_out


def _score_empty(model, tok, continuation: str) -> tuple[float, bool]:
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = [tok.bos_token_id, *cont]
    with torch.no_grad():
        logp = F.log_softmax(model({"input_ids": torch.tensor([ids[:-1]])})[0].float(), dim=-1)
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_eval_checkpoint_accuracy_equals_direct_computation(
    trained, llama_tok, tmp_path, monkeypatch, capsys
):
    from llmfoundry_lite.cli import main

    tasks, run, _ = trained
    monkeypatch.chdir(tasks)
    out = tmp_path / "scores"
    rc = main(["eval", str(run), "--tasks", TASKS, "--include-path", str(tasks), "--batch-size", "3",
               "--device", "cpu", "--out", str(out)])  # fmt: skip
    console = capsys.readouterr().out
    assert rc == 0, console
    summary = json.loads((out / "eval.json").read_text())
    got = {f"eval/{r['task']}/{r['metric']}": r["value"] for r in summary["rows"]}
    expected = _expected(_load_model(_checkpoint(run)), llama_tok)
    assert got == pytest.approx(expected, abs=1e-9), (got, expected)
    assert {r["n"] for r in summary["rows"]} == {12}
    # The console shows the table; eval.md holds it too.
    assert "| tiny_mc | acc |" in console and "| tiny_lambada | acc |" in console
    assert f"wrote eval.json and eval.md to {out}" in console
    assert "| tiny_mc | acc_norm |" in (out / "eval.md").read_text()


def test_callback_logs_the_same_accuracy_during_training(trained, llama_tok):
    """eval/<task>/<metric> in metrics.jsonl at each interval; at the end it is the final checkpoint's score."""
    _, run, stdout = trained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {
        r["step"]: {k: v for k, v in r.items() if k.startswith("eval/tiny")} for r in records if "step" in r
    }
    steps = sorted(s for s, m in logged.items() if m)
    assert steps == [2, 4], logged
    expected = _expected(_load_model(_checkpoint(run)), llama_tok, limit=CALLBACK_LIMIT)
    assert logged[4] == pytest.approx(expected, abs=1e-9), (logged[4], expected)
    assert "[lm_eval] ba 2: tiny_mc/acc " in stdout
    # Training went on in train mode after the evaluation at batch 2: the loss was logged for batches 3 and 4.
    assert all("loss/train/total" in next(r for r in records if r.get("step") == s) for s in (2, 3))


def test_eval_hf_folder_with_lm_evals_hf_model(trained, tmp_path, monkeypatch):
    """The exported folder of the same model, scored by lm-eval's own HFLM, gets the same accuracies."""
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (the eval extra has it)")
    from llmfoundry_lite.apps.evaluate.harness import evaluate
    from llmfoundry_lite.apps.export import export_checkpoint

    tasks, run, _ = trained
    monkeypatch.chdir(tasks)
    hf = export_checkpoint(_checkpoint(run), tmp_path / "hf")
    ours = evaluate(run, TASKS, include_path=str(tasks), device="cpu", out=tmp_path / "a")["rows"]
    theirs = evaluate(hf, TASKS, include_path=str(tasks), device="cpu", out=tmp_path / "b")["rows"]
    assert [(r["task"], r["metric"]) for r in ours] == [(r["task"], r["metric"]) for r in theirs]
    assert [r["value"] for r in ours] == pytest.approx([r["value"] for r in theirs], abs=1e-9)


def test_eval_user_errors_are_one_line(trained, tmp_path, monkeypatch, capsys):
    from llmfoundry_lite import registry
    from llmfoundry_lite.cli import main

    tasks, run, _ = trained

    def fails(*args: str) -> str:
        rc = main(["eval", *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert "no such checkpoint or model folder" in fails(str(tmp_path / "nope.pt"), "--tasks", "tiny_mc")
    # A MosaicBERT checkpoint is an encoder: GLUE scores it.
    bert = registry.build("models", {"name": "mosaic_bert", "d_model": 32, "n_layers": 1, "n_heads": 2,
                                     "intermediate_size": 48, "vocab_size": 100}, "model")  # fmt: skip
    torch.save({"state": {"model": bert.state_dict()}}, tmp_path / "bert.pt")
    err = fails(str(tmp_path / "bert.pt"), "--tasks", "tiny_mc", "--include-path", str(tasks))
    assert "not a decoder" in err and "llmfoundry-lite glue" in err
    # An unknown task is named, with the close names lm-eval's task manager knows.
    err = fails(str(run), "--tasks", "tiny_mcc", "--include-path", str(tasks))
    assert "unknown lm-eval task 'tiny_mcc'" in err and "'tiny_mc'" in err
    err = fails(str(run), "--tasks", "hellaswagg")
    assert "'hellaswag'" in err
    # Without lm-eval installed: the install command.
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert 'pip install -e ".[eval]"' in fails(str(run), "--tasks", "tiny_mc")


def test_callback_recipe_errors(monkeypatch):
    from llmfoundry_lite import registry
    from llmfoundry_lite.errors import RecipeError

    def error(block: dict) -> RecipeError:
        with pytest.raises(RecipeError) as e:
            registry.build("callbacks", block, "callbacks.lm_eval", default_name="lm_eval")
        return e.value

    for block, key in [
        ({"tasks": []}, "callbacks.lm_eval.tasks"),
        ({"tasks": ["x"], "interval": "often"}, "callbacks.lm_eval.interval"),
        ({"tasks": ["x"], "limit": 0}, "callbacks.lm_eval.limit"),
        ({"tasks": ["x"], "batch_size": 0}, "callbacks.lm_eval.batch_size"),
    ]:
        assert error(block).key == key, error(block)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert 'pip install -e ".[eval]"' in str(error({"tasks": ["hellaswag"]}))


def test_eval_help_imports_neither_torch_nor_lm_eval():
    """`llmfoundry-lite eval --help` stays fast: the verb's module imports its machinery only when it runs."""
    probe = (
        "import contextlib, io, sys\n"
        "from llmfoundry_lite.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    rc = main(['eval', '--help'])\n"
        "assert rc == 0 and '--include-path' in out.getvalue() and '--num-fewshot' in out.getvalue()\n"
        "print(sorted(m for m in ('torch', 'composer', 'lm_eval', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_scoring_for_a_training_run_leaves_random_state_alone(trained, llama_tok, monkeypatch):
    """lm-eval reseeds Python, numpy and torch by default; the callback's scoring must not reseed the run."""
    import random

    import numpy as np

    from llmfoundry_lite.apps.evaluate.adapter import DecoderLM
    from llmfoundry_lite.apps.evaluate.harness import run_tasks, task_manager

    tasks, run, _ = trained
    monkeypatch.chdir(tasks)
    names = TASKS.split(",")
    lm = DecoderLM(_load_model(_checkpoint(run)), llama_tok, batch_size=4)
    manager = task_manager(names, str(tasks))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    results = run_tasks(lm, names, manager, limit=2, bootstrap_iters=0, seed=False)
    assert set(results["results"]) == set(names)
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and (before[1] == after[1]).all() and torch.equal(before[2], after[2])
