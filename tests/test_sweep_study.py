"""The sweep's study bookkeeping without training: seeded sampling within bounds, the trial budget shared by
workers (a surplus ask never runs), and re-queuing a trial whose worker died with its parameters and folder."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmfoundry_lite.recipe import load_recipe
from llmfoundry_lite.sweep.plan import plan_sweep
from llmfoundry_lite.sweep.storage import (
    A_FOLDER,
    A_OWNER,
    A_REQUEUED,
    A_RETRY_OF,
    A_SURPLUS,
    ask_next,
    make_pruner,
    own_trials,
    requeue_dead,
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart" / "mosaicbert-tiny.yaml")
SWEPT = [
    "optimizer.lr=loguniform(1e-5,1e-2)",
    "optimizer.weight_decay=uniform(0.0,0.1)",
    "model.n_layers=int(1,3)",
    "model.intermediate_size=choice(64,96,128)",
    "optimizer.eps=1e-8,1e-6",  # a grid axis in a sampled search is a categorical choice
]


def fixed(tiny_bert) -> list[str]:
    return [
        o
        for o in tiny_bert()
        if o.partition("=")[0] not in {"save_folder", "model.n_layers", "model.intermediate_size"}
    ]


def draw(tiny_bert, tmp_path, sampler: str, seed: int, n: int = 12) -> list[dict]:
    plan = plan_sweep(
        QUICKSTART,
        [*fixed(tiny_bert), *SWEPT],
        trials=n,
        sampler=sampler,
        seed=seed,
        out=tmp_path / f"{sampler}{seed}",
    )
    study = plan.open_study()
    dists = plan.distributions()
    points = []
    while (trial := ask_next(study, plan.n_trials, dists)) is not None:
        params = {a.key: a.text(trial.params[a.key]) for a in plan.axes}
        points.append(params)
        study.tell(trial, float(trial.params["optimizer.lr"]))  # any objective: TPE needs values
    if not points:
        return points
    cfg = load_recipe(
        QUICKSTART, plan.trial_overrides("t000", points[0])
    )  # text reaches the recipe as numbers
    assert cfg["optimizer"]["lr"] == float(points[0]["optimizer.lr"])
    assert cfg["model"]["n_layers"] == int(points[0]["model.n_layers"])
    return points


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_sampling_is_seeded_within_bounds_and_stops_at_the_budget(tiny_bert, tmp_path, sampler):
    first = draw(tiny_bert, tmp_path / "a", sampler, 7)
    assert len(first) == 12  # then ask_next says the budget is reached
    assert draw(tiny_bert, tmp_path / "b", sampler, 7) == first  # reproducible
    assert draw(tiny_bert, tmp_path / "c", sampler, 8) != first
    for p in first:
        assert 1e-5 <= float(p["optimizer.lr"]) <= 1e-2
        assert 0.0 <= float(p["optimizer.weight_decay"]) <= 0.1
        assert p["model.n_layers"] in {"1", "2", "3"}
        assert p["model.intermediate_size"] in {"64", "96", "128"}
        assert p["optimizer.eps"] in {"1e-8", "1e-6"}
    lrs = sorted(float(p["optimizer.lr"]) for p in first)
    assert lrs[0] < 1e-4 and lrs[-1] > 1e-3  # log-uniform spreads over the decades


def test_a_surplus_ask_never_runs_and_workers_agree_on_the_budget(tiny_bert, tmp_path):
    plan = plan_sweep(QUICKSTART, [*fixed(tiny_bert), "optimizer.lr=1e-3,2e-3,3e-3"], out=tmp_path / "g")
    a, b = plan.open_study(), plan.open_study()  # two workers of one SQLite study
    dists = plan.distributions()
    t0, t1 = ask_next(a, plan.n_trials, dists), ask_next(b, plan.n_trials, dists)
    raced = []
    ask = a.ask

    def ask_after_b(fixed_distributions):  # b asks between a's budget check and a's own ask
        raced.append(ask_next(b, plan.n_trials, dists))
        return ask(fixed_distributions)

    a.ask = ask_after_b
    assert (
        ask_next(a, plan.n_trials, dists) is None
    )  # b's trial took number 2: a's (number 3) is over the budget
    assert ask_next(b, plan.n_trials, dists) is None
    surplus = [t for t in a.get_trials() if t.user_attrs.get(A_SURPLUS)]
    assert [t.number for t in surplus] == [3] and surplus[0].state.name == "FAIL"
    assert [t.number for t in own_trials(a)] == [0, 1, 2] and raced[0].number == 2
    lrs = {t.params["optimizer.lr"] for t in (t0, t1, raced[0])}
    assert lrs == {"1e-3", "2e-3", "3e-3"}  # grid points come from trial numbers: none twice


def test_trial_of_a_dead_worker_is_requeued_with_its_parameters_and_folder(tiny_bert, tmp_path):
    plan = plan_sweep(QUICKSTART, [*fixed(tiny_bert), "optimizer.lr=1e-3,2e-3"], out=tmp_path / "d")
    study = plan.open_study()
    dists = plan.distributions()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = ask_next(study, plan.n_trials, dists)
    orphan.set_user_attr(A_FOLDER, "t000")
    orphan.set_user_attr(A_OWNER, f"{socket.gethostname()}:{dead.pid}")
    alive = ask_next(study, plan.n_trials, dists)
    alive.set_user_attr(A_FOLDER, "t001")
    alive.set_user_attr(A_OWNER, f"{socket.gethostname()}:{subprocess.os.getpid()}")
    said = []
    assert requeue_dead(plan.open_study(), said.append) == 1 and "[t000]" in said[0]
    trials = study.get_trials()
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs[A_REQUEUED]
    assert trials[1].state.name == "RUNNING"  # its worker (this process) is alive
    retry = ask_next(
        study, plan.n_trials, dists
    )  # the queued copy comes first, beyond the fresh-trial budget
    assert retry is not None and retry.number == 2 and retry.user_attrs[A_RETRY_OF] == 0
    assert retry.params == orphan.params and retry.user_attrs[A_FOLDER] == "t000"
    assert [t.number for t in own_trials(study)] == [1, 2]
    assert ask_next(study, plan.n_trials, dists) is None


def test_pruners_take_their_resources_from_the_recipe(tiny_bert, tmp_path):
    import optuna

    args = [*fixed(tiny_bert), "max_duration=40ba", "eval_interval=5ba", "optimizer.lr=1e-3,2e-3"]
    plan = plan_sweep(QUICKSTART, args, prune="hyperband", out=tmp_path / "h")
    assert (plan.eval_every, plan.max_batches) == (5, 40)
    pruner = make_pruner(plan.pruner_spec())
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource) == (5, 40)
    median = plan_sweep(
        QUICKSTART, args, prune="median", prune_startup=2, prune_warmup=10, out=tmp_path / "m"
    )
    pruner = make_pruner(median.pruner_spec())
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert (pruner._n_startup_trials, pruner._n_warmup_steps) == (2, 10)
    assert isinstance(
        make_pruner(plan_sweep(QUICKSTART, args, out=tmp_path / "n").pruner_spec()), optuna.pruners.NopPruner
    )
