"""SMoE-Dropout FFNs (models/ffn.py) and their schedule callback (train/callbacks/smoe_schedule.py)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llmfoundry_lite import registry
from llmfoundry_lite.errors import RecipeError
from llmfoundry_lite.models.ffn import (
    FFNConfig,
    SMoEDropoutFFN,
    active_experts,
    k_at,
    mean_k,
    set_active_experts,
    smoe_layers,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICK_LLAMA = str(REPO / "recipes" / "quickstart" / "llama-tiny.yaml")
KILL_DRIVER = REPO / "tests" / "_kill_driver.py"
SMOE = {"name": "smoe_dropout", "n_experts": 4, "k_min": 2, "k_max": 4}
LLAMA = dict(
    vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_size=64, max_seq_len=16
)
BERT = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, intermediate_size=48, hidden_dropout=0.0)


def build(family: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    name, shape = ("llama", LLAMA) if family == "llama" else ("mosaic_bert", BERT)
    return registry.build("models", {"name": name, **shape, **kw}, "model")


def batch(family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 128, (3, 16), generator=g)
    if family == "llama":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    mask = (torch.arange(16)[None] < torch.tensor([[16], [9], [4]])).long()
    labels = torch.where(torch.rand(3, 16, generator=g) < 0.5, ids, -100) * mask + -100 * (1 - mask)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def per_token_reference(f: SMoEDropoutFFN, x: torch.Tensor) -> torch.Tensor:
    """The definition, token by token: sum over the chosen experts of weight x expert(x)."""
    _, idx, w = f.route(x)
    h, H = f.expert_width, f.hidden
    W, W2 = f.up_proj.weight, f.down_proj.weight
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            a = f.gate_act(x[t] @ W[e * h : (e + 1) * h].T) * (x[t] @ W[H + e * h : H + (e + 1) * h].T)
            out[t] += w[t, j] * (a @ W2[:, e * h : (e + 1) * h].T)
    return out + (f.down_proj.bias if f.down_proj.bias is not None else 0)


# ---------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_k_equals_n_with_unit_weights_is_the_dense_ffn_it_was_split_from(family, monkeypatch):
    dense = build(family).eval()
    smoe = build(family, seed=1, ffn={**SMOE, "k_min": 1}).eval()
    missing, unexpected = smoe.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("ffn.router.weight") for k in missing) and missing
    assert smoe.cfg.ffn["name"] == "smoe_dropout" and len(smoe_layers(smoe)) == 2
    assert active_experts(smoe) == 4  # outside training: k_max
    monkeypatch.setattr(SMoEDropoutFFN, "unit_weights", True)
    with torch.no_grad():
        a, b = dense(batch(family)), smoe(batch(family))
    assert float((a.loss - b.loss).abs()) <= 1e-6
    assert float((a.logits - b.logits).abs().max()) <= 1e-6
    # Same parameter count as the dense model, plus the router; the frozen router is no trainable parameter.
    n_dense = sum(p.numel() for p in dense.parameters())
    assert sum(p.numel() for p in smoe.parameters() if p.requires_grad) == n_dense


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_grouped_experts_compute_the_routed_mixture(family, k):
    model = build(family, ffn=SMOE)
    f = smoe_layers(model)[0]
    f.k = k
    x = torch.randn(40, 32)
    y = f(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, per_token_reference(f, x), atol=1e-5, rtol=1e-5)
    _, idx, w = f.route(x)
    assert idx.shape == (40, k) and torch.allclose(w.sum(-1), torch.ones(40))


@pytest.mark.parametrize("act", [F.silu, F.gelu])
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_hand_written_expert_backward_matches_finite_differences(act, p_drop):
    """ExpertLoop's backward (inputs, both weights, routing weights; dropout with its mask) against gradcheck."""
    from llmfoundry_lite.models.experts import DenseExperts, ExpertLoop

    g = torch.Generator().manual_seed(0)
    T, d, N, h, k = 11, 6, 4, 3, 2
    x, w_up, w_down = (
        torch.randn(*s, dtype=torch.float64, generator=g) for s in ((T, d), (2 * N * h, d), (d, N * h))
    )
    idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(T)])
    order = torch.argsort(idx.flatten(), stable=True)
    counts = torch.bincount(idx.flatten(), minlength=N).tolist()
    ws = torch.rand(T * k, dtype=torch.float64, generator=g)
    args = [t.requires_grad_() for t in (x, w_up, w_down, ws)]

    def f(*a):
        torch.manual_seed(5)  # the same dropout mask at every evaluation
        return ExpertLoop.apply(*a, order // k, counts, act, p_drop)

    assert torch.autograd.gradcheck(f, args)

    w = torch.rand(T, N, dtype=torch.float64, generator=g, requires_grad=True)  # k = N: every expert

    def dense(x, w_up, w_down, w):
        torch.manual_seed(5)
        return DenseExperts.apply(x, w_up, w_down, w, act, p_drop)

    assert torch.autograd.gradcheck(dense, (x, w_up, w_down, w))


def test_only_selected_experts_run(monkeypatch):
    """Grouped compute: the experts see exactly the k x tokens selected (token, expert) rows, not N x tokens."""
    f = smoe_layers(build("llama", ffn=SMOE))[0]
    rows = []
    real_linear = F.linear

    def counting(x, w, b=None):
        if tuple(w.shape) == (2 * f.expert_width, 32):  # an expert's fused gate|up block
            rows.append(x.shape[0])
        return real_linear(x, w, b)

    monkeypatch.setattr(F, "linear", counting)
    f.k = 2
    f(torch.randn(50, 32))
    assert sum(rows) == 2 * 50 and len(rows) <= 4


def test_frozen_router_gets_no_gradient_nor_optimizer_state():
    model = build("llama", ffn=SMOE)
    routers = [m.router.weight for m in smoe_layers(model)]
    assert all(not r.requires_grad for r in routers)
    model.loss(model(batch("llama")), batch("llama")).backward()
    assert all(r.grad is None for r in routers)
    from llmfoundry_lite.train.build import build_optimizer

    opt = build_optimizer({"optimizer": {"name": "decoupled_adamw", "lr": 1e-3}}, model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(r) for r in routers}


def test_learned_router_trains_and_has_a_balance_loss():
    from llmfoundry_lite.models.ffn import balance_loss

    model = build("llama", ffn={**SMOE, "router": "learned"})
    set_active_experts(model, 2)
    out = model(batch("llama"))
    aux = balance_loss(model)
    assert aux is not None and float(aux) >= 1.0 - 1e-5  # N * sum f_e P_e >= 1, equality when uniform
    (out.loss + aux).backward()
    assert all(m.router.weight.grad is not None for m in smoe_layers(model))


# ---------------------------------------------------------------------------------------------------------
# Schedules, config, accounting
# ---------------------------------------------------------------------------------------------------------


def test_schedules_rise_from_k_min_to_k_max():
    lin = FFNConfig(name="smoe_dropout", n_experts=16, k_min=8, k_max=16)
    steps = 1000
    for step in (0, 1, 250, 499, 500, 999):  # the official code's linear_increase
        assert k_at(lin, step / steps) == round(8 * step / steps) + 8
    assert k_at(lin, 1.0) == 16
    for schedule in ("linear", "cosine", "exponential", "step"):
        cfg = FFNConfig(name="smoe_dropout", n_experts=16, k_min=1, k_max=16, schedule=schedule)
        ks = [k_at(cfg, i / 200) for i in range(201)]
        assert ks[0] == 1 and ks == sorted(ks), schedule
        # the official exponential schedule stops at k_max - round(15 x 0.99^300) = 15
        assert ks[-1] == (15 if schedule == "exponential" else 16), schedule
    step = FFNConfig(name="smoe_dropout", n_experts=16, k_min=1, k_max=16, schedule="step")
    assert sorted(set(k_at(step, i / 100) for i in range(100))) == [1, 2, 4, 8, 16]
    assert mean_k(lin) == pytest.approx(12.0, abs=0.01)


@pytest.mark.parametrize(
    "ffn,key,words",
    [
        ({"name": "smoe_dropout", "n_experts": 5}, "model.ffn.n_experts", "does not divide"),
        ({"name": "smoe_dropout", "n_experts": 4, "k_min": 4, "k_max": 2}, "model.ffn.k_min", "above k_max"),
        ({"name": "smoe_dropout", "n_experts": 4, "k_max": 8}, "model.ffn.k_max", "between 1 and"),
        ({"name": "smoe_dropout", "eval_k": [0]}, "model.ffn.eval_k", "between 1 and"),
        ({"name": "smoe_dropout", "n_expert": 4}, "model.ffn.n_expert", "n_experts"),
        ({"name": "moe"}, "model.ffn.name", "smoe_dropout"),
    ],
)
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_bad_ffn_blocks_name_the_key(family, ffn, key, words):
    with pytest.raises(RecipeError, match=words) as e:
        build(family, ffn=ffn)
    assert e.value.key == key


def test_flops_count_active_parameters_at_the_current_k():
    dense, smoe = build("llama"), build("llama", ffn=SMOE)
    b = batch("llama")
    assert smoe.flops.per_batch(b) > dense.flops.per_batch(b)  # k = N: the dense FFN plus the router
    tokens = b["input_ids"].numel()
    per_k = 3 * 32 * (64 // 4) * 2  # one expert's three blocks, two layers
    full = smoe.flops.per_batch(b)
    set_active_experts(smoe, 2)
    assert full - smoe.flops.per_batch(b) == 6 * tokens * per_k * 2


# ---------------------------------------------------------------------------------------------------------
# Training: the schedule, per-k evaluation, the frozen router, kill -9 and resume
# ---------------------------------------------------------------------------------------------------------


def tiny_llama(tok: str, data: str, tmp_path, **extra) -> list[str]:
    values = {
        "variables.tokenizer_path": tok,
        "variables.data_local": data,
        "max_seq_len": 32,
        "model.d_model": 32,
        "model.n_layers": 1,
        "model.n_heads": 2,
        "model.n_kv_heads": 1,
        "model.ffn.name": "smoe_dropout",
        "model.ffn.n_experts": 4,
        "model.ffn.k_min": 1,
        "model.ffn.k_max": 4,
        "global_train_batch_size": 4,
        "device_train_microbatch_size": 4,
        "device_eval_batch_size": 4,
        "max_duration": "6ba",
        "eval_interval": "3ba",
        "eval_subset_num_batches": 1,
        "save_interval": "2ba",
        "save_num_checkpoints_to_keep": -1,
        "save_folder": str(tmp_path / "runs" / "{run_name}"),
        "console_log_interval": "1ba",
        "callbacks.generate.interval": "100ba",
        "callbacks.generate.max_new_tokens": 2,
        "deterministic": True,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def metric_rows(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_training_follows_the_schedule_evaluates_per_k_and_keeps_the_router_frozen(
    llama_tokenizer_dir, causal_mds_dir, tmp_path
):
    from llmfoundry_lite.recipe import load_recipe
    from llmfoundry_lite.train.run import build_trainer

    overrides = tiny_llama(llama_tokenizer_dir, causal_mds_dir, tmp_path, run_name="sched")
    cfg = load_recipe(QUICK_LLAMA, overrides + ["model.ffn.eval_k=[1,2]"])
    trainer = build_trainer(cfg, QUICK_LLAMA)
    model = trainer.state.model
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if "router" in n}
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if "ffn.w13" in n}
    assert routers and experts
    trainer.fit()
    trainer.close()
    for n, p in model.named_parameters():
        if n in routers:
            assert torch.equal(p, routers[n]), n  # frozen: no gradient, no weight decay
        if n in experts:
            assert not torch.equal(p, experts[n]), n
    opt_params = {id(p) for g in trainer.state.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for n, p in model.named_parameters() if "router" in n}

    rows = metric_rows(tmp_path / "runs" / "sched")
    ks = [r["smoe/k"] for r in rows if "smoe/k" in r]
    assert ks == [round(3 * b / 6) + 1 for b in range(6)]  # linear, k_min 1 -> k_max 4 over 6 batches
    keys = set().union(*rows)
    for label in ("eval", "eval/k1", "eval/k2"):
        assert f"metrics/{label}/LanguageCrossEntropy" in keys, sorted(keys)
    last = {k: v for r in rows for k, v in r.items()}
    # fewer experts, a different function: the per-k losses differ, and k = 1 is the training k's worst
    assert last["metrics/eval/k1/LanguageCrossEntropy"] != last["metrics/eval/k2/LanguageCrossEntropy"]
    assert active_experts(model) == ks[-1]  # evaluation at k1/k2 gave the training k back


def test_sigkill_mid_run_resumes_bit_identical_k_router_and_experts(
    llama_tokenizer_dir, causal_mds_dir, tmp_path
):
    from llmfoundry_lite.recipe import load_recipe
    from llmfoundry_lite.train.run import build_trainer

    env = {
        **os.environ,
        "WANDB_MODE": "offline",
    }  # conftest put the checkout first on PYTHONPATH, kept the rest
    cfg = load_recipe(
        QUICK_LLAMA, tiny_llama(llama_tokenizer_dir, causal_mds_dir, tmp_path, run_name="whole")
    )
    trainer = build_trainer(cfg, QUICK_LLAMA)
    trainer.fit()
    trainer.close()

    marker = tmp_path / "killed-once"
    cmd = [
        sys.executable, str(KILL_DRIVER), QUICK_LLAMA,
        *tiny_llama(llama_tokenizer_dir, causal_mds_dir, tmp_path, run_name="crashy"),
        "callbacks.kill_once.batch=3", f"callbacks.kill_once.marker={marker}",
    ]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming run crashy from batch 2" in second.stdout

    def state(run: str) -> dict:
        return torch.load(
            tmp_path / "runs" / run / "ep0-ba6-rank0.pt", map_location="cpu", weights_only=False
        )

    ref, resumed = state("whole")["state"], state("crashy")["state"]
    assert any("router" in k for k in ref["model"])
    for k, v in ref["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(resumed["model"][k], v), k
    last_k = round(3 * 5 / 6) + 1  # the k of batch 6, checkpointed with the callback
    assert resumed["callbacks"]["SMoESchedule"] == ref["callbacks"]["SMoESchedule"] == {"k": last_k}
    ks = [r["smoe/k"] for r in metric_rows(tmp_path / "runs" / "crashy") if "smoe/k" in r]
    assert ks[-4:] == [2, 3, 3, 3]  # resumed from batch 2's checkpoint: batches 3-6 at the schedule's k


# ---------------------------------------------------------------------------------------------------------
# Recipes, estimate, inference at a chosen k, export
# ---------------------------------------------------------------------------------------------------------


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from llmfoundry_lite.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("recipe", ["llama/125m-smoe", "mosaicbert/base-smoe"])
def test_smoe_recipes_show_and_validate(recipe, capsys, request):
    path = REPO / "recipes" / f"{recipe}.yaml"
    # the published tokenizers and corpora are hub names and big folders; local ones stand in offline
    llama = recipe.startswith("llama")
    tok = request.getfixturevalue("llama_tokenizer_dir" if llama else "bert_tokenizer_dir")
    data = request.getfixturevalue("causal_mds_dir" if llama else "mlm_mds_dir")
    local = [f"variables.tokenizer_name={tok}", f"variables.data_local={data}", "max_seq_len=128"]
    # validate refuses a split smaller than one batch: the small local splits take smaller batches
    local += [] if llama else ["global_train_batch_size=64", "device_eval_batch_size=8"]
    code, out, err = run_cli(capsys, "validate", path, *local)
    assert code == 0, err
    code, out, err = run_cli(capsys, "show", path, *local)
    assert code == 0 and "name: smoe_dropout" in out and "k_min: 8" in out and "router: random_frozen" in out
    code, out, err = run_cli(capsys, "validate", path, *local, "model.ffn.n_experts=7")
    assert code == 2 and "model.ffn.n_experts" in err and "does not divide" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_estimate_charges_the_experts_active_over_the_schedule():
    from llmfoundry_lite.apps.estimate import estimate
    from llmfoundry_lite.models.ffn import ffn_config
    from llmfoundry_lite.recipe import load_recipe

    dense_path, smoe_path = REPO / "recipes/llama/125m.yaml", REPO / "recipes/llama/125m-smoe.yaml"
    dense = estimate(load_recipe(dense_path), str(dense_path), gpu="a100-80gb", gpus=8, mfu=0.4)
    cfg = load_recipe(smoe_path)
    smoe = estimate(cfg, str(smoe_path), gpu="a100-80gb", gpus=8, mfu=0.4)
    L, d, H, N = 12, 768, 2048, 16
    k = mean_k(ffn_config(cfg.model.ffn))
    assert k == pytest.approx(12.0, abs=0.01)
    # 6 x (router d x N  -  the unselected experts' 3 d H/N each) per token and layer
    expected = dense.flops_per_token + 6 * L * (d * N - (N - k) * 3 * d * (H // N))
    assert smoe.flops_per_token == pytest.approx(expected, rel=1e-9)
    assert "mean k 12.0 of 16" in smoe.flops_source
    assert smoe.params == dense.params + L * d * N  # the same weights plus the routers


def test_a_chosen_k_runs_generation_and_evaluation(llama_tok):
    model = registry.build(
        "models", {"name": "llama", **LLAMA, "vocab_size": None, "ffn": SMOE}, "model", tokenizer=llama_tok
    )
    model.eval()
    prompt = torch.tensor([llama_tok("The object of")["input_ids"]])
    outs = {}
    for k in (1, 4):
        assert set_active_experts(model, k) == 2
        outs[k] = model.generate(prompt, max_new_tokens=4, temperature=0)
        assert outs[k].shape == (1, prompt.shape[1] + 4)
    with torch.no_grad():
        losses = {}
        for k in (1, 2, 4):
            set_active_experts(model, k)
            losses[k] = float(
                model(batch("llama") | {"input_ids": batch("llama")["input_ids"] % len(llama_tok)}).loss
            )
    assert len(set(losses.values())) == 3  # each k is a different sub-network
    # the recipe's inference k (model.ffn.k) is what a freshly built model runs at
    fixed = registry.build("models", {"name": "llama", **LLAMA, "ffn": {**SMOE, "k": 3}}, "model")
    assert active_experts(fixed) == 3
    with pytest.raises(ValueError, match="between 1 and n_experts=4"):
        set_active_experts(model, 5)


def test_export_to_hugging_face_refuses_smoe_in_one_line(tmp_path, capsys, llama_tokenizer_dir):
    model = build("llama", ffn=SMOE)
    path = tmp_path / "ckpt.pt"
    torch.save({"state": {"model": model.state_dict()}}, path)
    code, out, err = run_cli(capsys, "export", path, tmp_path / "hf", "--tokenizer", llama_tokenizer_dir)
    assert code == 2 and "model.ffn" in err and "SMoE-Dropout" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_docs_commands_run(capsys, llama_tokenizer_dir, causal_mds_dir, bert_tokenizer_dir, mlm_mds_dir):
    """docs/smoe.md's commands: show/validate as written; train validated (the training test above runs it)."""
    import re
    import shlex

    doc = (REPO / "docs" / "smoe.md").read_text()
    block = re.findall(r"```bash\n(.*?)```", doc, re.S)[0]
    commands = [shlex.split(line) for line in block.strip().splitlines()]
    assert [c[:2] for c in commands] == [
        ["llmfoundry-lite", "show"],
        ["llmfoundry-lite", "validate"],
        ["llmfoundry-lite", "train"],
        ["python", "scripts/benchmark_smoe.py"],
    ]
    for argv in commands[:3]:
        verb, recipe, *overrides = argv[1:]
        if "mosaicbert" in recipe:
            local = [f"variables.tokenizer_name={bert_tokenizer_dir}", f"variables.data_local={mlm_mds_dir}"]
            local += ["global_train_batch_size=64", "device_eval_batch_size=8"]  # the small split's size
        elif "quickstart" in recipe:
            local = [
                f"variables.tokenizer_path={llama_tokenizer_dir}",
                f"variables.data_local={causal_mds_dir}",
            ]
        else:
            local = [
                f"variables.tokenizer_name={llama_tokenizer_dir}",
                f"variables.data_local={causal_mds_dir}",
            ]
        local.append("max_seq_len=128")
        verb = "validate" if verb == "train" else verb
        code, out, err = run_cli(capsys, verb, REPO / recipe, *overrides, *local)
        assert code == 0, (argv, err)
    assert "--ffn-only" in commands[3]
    assert re.search(r"^def main\(", (REPO / "scripts" / "benchmark_smoe.py").read_text(), re.M)
