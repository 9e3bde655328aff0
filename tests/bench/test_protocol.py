"""Benchmark v2 protocol: baselines, search, selection rule, splits, ν log, profile plot."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from tekfac.bench import search as search_module
from tekfac.bench import tune as tune_module
from tekfac.bench.data import Dataset
from tekfac.bench.optimizers import (
    BASELINES,
    DEFAULT_HPARAMS,
    EXTRA_MODULES,
    MissingExtraError,
    make_optimizer,
    muon_split,
    warmup_cosine_schedule,
)
from tekfac.bench.report import performance_profile
from tekfac.bench.runner import Split, run
from tekfac.bench.search import SPACES, TRIALS, draw, select, selection_key, steps_to_target
from tekfac.bench.tasks import TASKS
from tekfac.bench.tune import main_tune, tuning_split
from tekfac.cli import main

NEEDS_OPTUNA = pytest.mark.skipif(importlib.util.find_spec("optuna") is None,
                                  reason="optuna (bench extra) not installed")


def _available(name: str) -> bool:
    module = EXTRA_MODULES.get(name)
    return module is None or importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("task_name", ["fmnist-cnn", "digits-mlp"])
@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_builds_and_takes_two_steps(name, task_name):
    if not _available(name):
        pytest.skip(f"{EXTRA_MODULES[name]} (bench extra) not installed")
    task = TASKS[task_name]
    torch.manual_seed(0)
    model = task.build()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(name, model, DEFAULT_HPARAMS[name], task.loss, task.weight_decay)
    schedule = warmup_cosine_schedule(opt, 2, 0.5)
    x = torch.rand(8, *(1, 28, 28) if task.dataset == "fashion-mnist" else (1, 8, 8))
    y = torch.randint(0, 10, (8,))
    for _ in range(2):
        loss = task.loss_fn(task.forward(model, task.inputs(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        assert math.isfinite(loss.item())
    assert all(math.isfinite(p.abs().sum().item()) for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_missing_extra_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pytorch_optimizer", None)
    with pytest.raises(MissingExtraError, match=r"pip install -e '\.\[bench\]'"):
        make_optimizer("soap", nn.Linear(2, 2), {"lr": 1e-3}, "cross_entropy", 0.0)


def test_muon_takes_hidden_matrices_only():
    cnn = TASKS["fmnist-cnn"].build()
    hidden, rest = muon_split(cnn)
    linears = [m for m in cnn.modules() if isinstance(m, nn.Linear)]
    assert [id(p) for p in hidden] == [id(linears[0].weight)]  # not the head, not the convs
    assert len(hidden) + len(rest) == len(list(cnn.parameters()))
    gpt = TASKS["text-gpt"].build()
    hidden, _ = muon_split(gpt)
    assert all(p is not gpt.tok.weight and p is not gpt.pos.weight for p in hidden)
    assert muon_split(TASKS["fmnist-vgg"].build())[0] == []  # convolutions and a head only


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine_schedule(opt, 10, 0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[2] > lrs[5] > lrs[9] > 0


@NEEDS_OPTUNA
def test_every_optimizer_gets_the_same_number_of_sobol_trials_inside_its_space():
    for name, space in SPACES.items():
        trials = draw(name)
        assert len(trials) == TRIALS == 16
        assert trials == draw(name)  # deterministic for a seed
        assert trials != draw(name, seed=1)
        for key, r in space.items():
            values = [t[key] for t in trials]
            assert all(r.low <= v <= r.high for v in values)
            # a balanced Sobol sample: one point in each sixteenth of the (log) range
            scale = math.log if r.log else float
            u = [(scale(v) - scale(r.low)) / (scale(r.high) - scale(r.low)) for v in values]
            assert sorted(min(int(16 * x), 15) for x in u) == list(range(16))
        assert all(set(t) == set(space) for t in trials)


def _trial(steps, metric, diverged=False, name="x"):
    return dict(optimizer="sgd", index=0, params={"name": name}, steps_to_target=steps,
                final_val_metric=metric, wall_time_s=1.0, diverged=diverged)


def test_selection_rule_on_constructed_records():
    trials = [_trial(None, 0.99, name="never"), _trial(300, 0.91, name="slow"),
              _trial(200, 0.90, name="fast-worse"), _trial(200, 0.92, name="fast-better"),
              _trial(100, math.nan, diverged=True, name="diverged")]
    assert select(trials, higher_is_better=True)["params"]["name"] == "fast-better"
    # none reaches: the final metric decides, diverged last
    trials = [_trial(None, 0.80, name="a"), _trial(None, 0.85, name="b"),
              _trial(None, math.nan, diverged=True, name="d")]
    assert select(trials, True)["params"]["name"] == "b"
    # lower is better (reconstruction error): ties broken by the smaller final metric
    trials = [_trial(50, 13.0, name="hi"), _trial(50, 12.0, name="lo"),
              _trial(None, 10.0, name="never")]
    assert select(trials, higher_is_better=False)["params"]["name"] == "lo"
    # diverged always loses, even against a trial that never reaches the target
    assert selection_key(_trial(10, 1.0, diverged=True), True) > selection_key(
        _trial(None, 0.1), True)
    with pytest.raises(ValueError):
        select([], True)


def test_steps_to_target_respects_direction():
    records = [dict(step=s, test_metric=m) for s, m in ((0, 20.0), (5, 15.0), (10, 13.0))]
    assert steps_to_target(records, 14.0, higher_is_better=False) == 10
    assert steps_to_target(records, 16.0, higher_is_better=True) == 0
    assert steps_to_target(records, 12.0, higher_is_better=False) is None


def test_validation_split_never_overlaps_the_test_set():
    # every example a distinct constant image: its value identifies it
    n_train, n_test = 200, 50
    values = torch.randperm(n_train + n_test).float()
    images = values.view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()
    labels = torch.arange(n_train + n_test) % 10
    data = Dataset("digits", images[:n_train], labels[:n_train], images[n_train:],
                   labels[n_train:], 10)
    split = tuning_split(data)
    ids = {name: set(x[:, 0, 0, 0].tolist()) for name, x in
           (("train", split.train_x), ("val", split.eval_x), ("test", data.test_x))}
    assert not ids["val"] & ids["test"] and not ids["train"] & ids["test"]
    assert not ids["val"] & ids["train"]
    assert len(ids["val"]) == 20 and len(ids["train"]) == 180
    assert ids["train"] | ids["val"] == set(data.train_x[:, 0, 0, 0].tolist())


def _tiny_split():
    x = torch.rand(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    return Split(x, y, x[:16], y[:16])


def test_runner_evaluates_several_times_per_epoch_and_logs_nu():
    task = TASKS["digits-mlp"]
    records = run(task, _tiny_split(), "tekfac", {"lr": 0.5, "damping": 0.1, "kl_clip": 1e-6},
                  seed=0, epochs=2, batch_size=8, quiet=True, evals_per_epoch=4,
                  measure_memory=True)
    assert [r["step"] for r in records] == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert [r["epoch"] for r in records][-1] == 2 and records[2]["epoch"] == 0.5
    assert [r["last"] for r in records] == [False] * 8 + [True]
    assert records[0]["peak_memory_mb"] > 0
    nus = [v for r in records[1:] for v in r["kl_clip_factors"]]
    assert len(nus) == 16 and all(0 < v <= 1 for v in nus)
    assert min(nus) < 1  # κ = 1e-6 clips
    times = [r["wall_time_s"] for r in records]
    assert times == sorted(times)
    sgd = run(task, _tiny_split(), "sgd", {"lr": 0.1}, seed=0, epochs=1, batch_size=8,
              quiet=True, evals_per_epoch=4)
    assert all("kl_clip_factors" not in r for r in sgd)


def test_runner_takes_a_step_budget_its_evaluation_steps_and_a_stop_rule():
    """20 steps of 8 steps per pass: 3 passes, the last cut short; the evaluations at the
    steps asked for and at the end; the schedule spans the 20 steps even when the run stops
    early, so the stopped run is the whole run's beginning."""
    task, split = TASKS["digits-mlp"], _tiny_split()
    whole = run(task, split, "sgd", {"lr": 0.1}, seed=0, epochs=1, batch_size=8, quiet=True,
                steps=20, eval_steps=[0, 3, 8, 13, 25], warmup_fraction=0.2)
    assert [r["step"] for r in whole] == [0, 3, 8, 13, 20]
    assert [r["epoch"] for r in whole] == [0, 3 / 8, 1, 13 / 8, 20 / 8]
    assert [r["last"] for r in whole] == [False] * 4 + [True]
    asked = []

    def at_eight(record: dict) -> bool:
        asked.append(record["step"])
        return record["step"] >= 8

    cut = run(task, split, "sgd", {"lr": 0.1}, seed=0, epochs=1, batch_size=8, quiet=True,
              steps=20, eval_steps=[3, 8, 13], warmup_fraction=0.2, stop_when=at_eight)
    assert asked == [3, 8] and [r["step"] for r in cut] == [0, 3, 8] and cut[-1]["last"]
    assert [(r["train_loss"], r["test_metric"]) for r in cut] == [
        (r["train_loss"], r["test_metric"]) for r in whole[:3]]
    with pytest.raises(ValueError, match="at least one step"):
        run(task, split, "sgd", {"lr": 0.1}, seed=0, epochs=1, batch_size=8, steps=0)


@NEEDS_OPTUNA
def test_the_adaptive_damping_coordinate_switches_at_one_half():
    model = TASKS["digits-mlp"].build()
    for value, adaptive in ((0.0, False), (0.49, False), (0.5, True), (1.0, True)):
        opt = make_optimizer("tekfac", model, {"lr": 0.1, "damping": 0.1,
                                               "damping_adaptive": value}, "cross_entropy", 0.0)
        assert (opt.damping_adaptation is not None) == adaptive
        opt.preconditioner.remove_hooks()
    assert sum(t["damping_adaptive"] >= 0.5 for t in draw("tekfac")) == 8


def test_the_basis_options_and_intervals_reach_the_kronecker_optimizer():
    model = TASKS["digits-mlp"].build()
    opt = make_optimizer("tekfac", model, {"lr": 0.1, "damping": 0.1, "basis_rank": 16.0,
                                           "basis_refresh_freq": 10.0, "eigen_update_freq": 20.0},
                         "cross_entropy", 0.0)
    config = opt.preconditioner.config
    assert (config.basis_rank, config.basis_refresh_freq, config.eigen_update_freq) == (16, 10, 20)
    assert config.cov_update_freq == 10  # the benchmark's fixed interval when not given
    opt.preconditioner.remove_hooks()


@pytest.mark.parametrize("name", ["kfac", "tekfac"])
def test_the_benchmarks_kl_bound_sits_at_its_schedules_peak(name):
    """The benchmark builds its scheduler on the optimizer's own rate, so the KL clip's
    reference rate (``kl_clip_lr``, the rate at construction) is the scheduler's
    ``initial_lr``, the reference of the rule before ``kl_clip_lr``: the tuned values describe
    the same runs under both rules."""
    model = TASKS["digits-mlp"].build()
    opt = make_optimizer(name, model, {"lr": 0.3, "damping": 0.1, "kl_clip": 1e-3},
                         "cross_entropy", 0.0)
    warmup_cosine_schedule(opt, 100, 0.05)
    assert [g["kl_clip_lr"] for g in opt.param_groups] == [g["initial_lr"] for g in
                                                           opt.param_groups] == [0.3]
    opt.preconditioner.remove_hooks()


def test_runner_steps_in_a_closure_and_logs_the_damping_when_it_adapts():
    task = TASKS["digits-mlp"]
    hparams = {"lr": 0.1, "damping": 1e-2, "damping_adaptive": 1.0}
    records = run(task, _tiny_split(), "tekfac", hparams, seed=0, epochs=2, batch_size=8,
                  quiet=True, evals_per_epoch=2, measure_memory=True)
    dampings = [r["damping"] for r in records[1:]]
    assert len(dampings) == 4 and len(set(dampings)) > 1  # adapted every 5 of the 16 steps
    assert all(math.isfinite(r["train_loss"]) for r in records[1:])
    fixed = run(task, _tiny_split(), "tekfac", {"lr": 0.5, "damping": 1e-3}, seed=0, epochs=1,
                batch_size=8, quiet=True)
    assert all("damping" not in r for r in fixed)


def _trial_records(metric: float) -> list[dict]:
    """A trial's run records as ``run`` returns them: before training and after 10 steps."""
    return [dict(step=0, test_metric=0.1, wall_time_s=0.0, diverged=False),
            dict(step=10, test_metric=metric, wall_time_s=1.0, diverged=False)]


def _fake_tuning(monkeypatch, fake_run) -> None:
    """Let ``main_tune`` train with ``fake_run`` on a random 100-image data set."""
    monkeypatch.setattr(tune_module, "run", fake_run)
    monkeypatch.setattr(tune_module, "load_dataset", lambda *a: Dataset(
        "digits", torch.rand(100, 1, 8, 8), torch.zeros(100, dtype=torch.long),
        torch.rand(10, 1, 8, 8), torch.zeros(10, dtype=torch.long), 10))


@NEEDS_OPTUNA
def test_tune_records_every_trial_and_resumes(tmp_path, monkeypatch):
    task = TASKS["digits-mlp"]
    calls = []

    def fake_run(task, split, optimizer, hparams, seed, epochs, batch_size, *args, **kw):
        calls.append((optimizer, hparams["lr"]))
        metric = 1 - abs(math.log10(hparams["lr"]) + 1.5)  # best near lr 0.03
        return _trial_records(metric)

    _fake_tuning(monkeypatch, fake_run)
    out = tmp_path / "t.json"
    main_tune(task.name, ["sgd", "adamw"], 1, None, 32, None, out, True, "cpu", "cmd",
              trials=4)
    result = json.loads(out.read_text())
    assert len(calls) == 8
    assert [t["optimizer"] for t in result["trials"]] == ["sgd"] * 4 + ["adamw"] * 4
    assert {"spaces", "budget", "command", "machine", "wall_time_s"} <= set(result)
    sgd = [t for t in result["trials"] if t["optimizer"] == "sgd"]
    best = max(sgd, key=lambda t: t["final_val_metric"])  # none reaches 0.95: final metric
    assert result["chosen"]["sgd"] == best["params"]
    # resume: an interrupted file (last trial missing) reruns that trial only
    result["trials"] = result["trials"][:-1]
    del result["parts"]  # as the files written before the parts were recorded
    out.write_text(json.dumps(result))
    calls.clear()
    main_tune(task.name, ["sgd", "adamw"], 1, None, 32, None, out, True, "cpu", "cmd",
              trials=4, resume=True)
    assert len(calls) == 1 and calls[0][0] == "adamw"
    resumed = json.loads(out.read_text())
    assert len(resumed["trials"]) == 8
    assert [p["command"] for p in resumed["parts"]] == ["cmd", "cmd"]
    assert resumed["wall_time_s"] == pytest.approx(sum(p["wall_time_s"] for p in resumed["parts"]))
    # resume: a trial whose values the space no longer draws (a changed range) runs again
    stale = json.loads(out.read_text())
    stale["trials"][1]["params"] = {"lr": 0.5}
    out.write_text(json.dumps(stale))
    calls.clear()
    main_tune(task.name, ["sgd", "adamw"], 1, None, 32, None, out, True, "cpu", "cmd",
              trials=4, resume=True)
    assert calls == [("sgd", draw("sgd", 4)[1]["lr"])]
    with pytest.raises(SystemExit, match="budget"):
        main_tune(task.name, ["sgd"], 2, None, 32, None, out, True, "cpu", "cmd", trials=4,
                  resume=True)


@NEEDS_OPTUNA
def test_two_tune_processes_share_one_file(tmp_path, monkeypatch):
    """A second ``tekfac tune --resume`` (other optimizers) writes the file while the first
    runs: neither loses the other's trials, chosen values or invocation."""
    out = tmp_path / "t.json"
    nested = []

    def fake_run(task, split, optimizer, hparams, *args, **kw):
        if optimizer == "sgd" and not nested:  # the other process finishes during this trial
            nested.append(1)
            main_tune("digits-mlp", ["adamw"], 1, None, 32, None, out, True, "cpu", "second",
                      trials=2, resume=True)
        return _trial_records(hparams["lr"])

    _fake_tuning(monkeypatch, fake_run)
    main_tune("digits-mlp", ["sgd"], 1, None, 32, None, out, True, "cpu", "first", trials=2,
              resume=True)
    result = json.loads(out.read_text())
    assert sorted((t["optimizer"], t["index"]) for t in result["trials"]) == [
        ("adamw", 0), ("adamw", 1), ("sgd", 0), ("sgd", 1)]
    assert set(result["chosen"]) == {"sgd", "adamw"} and set(result["spaces"]) == {"sgd", "adamw"}
    assert sorted(p["command"] for p in result["parts"]) == ["first", "second"]
    assert result["wall_time_s"] == pytest.approx(sum(p["wall_time_s"] for p in result["parts"]))
    assert [f.name for f in tmp_path.iterdir()] == ["t.json"]  # no temporary file left


@NEEDS_OPTUNA
def test_tune_adds_the_fixed_settings_to_every_trial_of_their_optimizer(tmp_path, monkeypatch):
    seen = []

    def fake_run(task, split, optimizer, hparams, *args, **kw):
        seen.append((optimizer, dict(hparams)))
        return _trial_records(hparams["lr"])

    _fake_tuning(monkeypatch, fake_run)
    monkeypatch.setitem(search_module.FIXED, "digits-mlp", {"sgd": {"basis_rank": 7}})
    out = tmp_path / "t.json"
    main_tune("digits-mlp", ["sgd", "adamw"], 1, None, 32, None, out, True, "cpu", "cmd",
              trials=2)
    assert [h.get("basis_rank") for _, h in seen] == [7, 7, None, None]
    assert [h["lr"] for o, h in seen if o == "sgd"] == [p["lr"] for p in draw("sgd", 2)]
    result = json.loads(out.read_text())
    assert result["fixed"] == {"sgd": {"basis_rank": 7}}
    assert result["chosen"]["sgd"]["basis_rank"] == 7
    every_step = {"cov_update_freq": 1, "eigen_update_freq": 5, "scale_update_freq": 1}
    assert search_module.fixed("fmnist-autoencoder", "tekfac") == {**every_step,
                                                                   "basis_rank": 128}
    assert search_module.fixed("fmnist-autoencoder", "kfac") == every_step
    assert search_module.fixed("fmnist-cnn", "tekfac") == {}


def test_performance_profile_is_written(tmp_path):
    rows = [dict(task=t, optimizer=o, time_to_target_s_median=v) for t, o, v in (
        ("a", "sgd", 10.0), ("a", "tekfac", 20.0), ("b", "sgd", None), ("b", "tekfac", 5.0))]
    path = performance_profile(rows, tmp_path / "profile.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_a_baseline_whose_extra_is_missing(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytorch_optimizer" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        main(["bench", "--preset", "smoke", "--optimizers", "soap"])
    assert info.value.code == 2
    assert "install the bench extra" in capsys.readouterr().err


def test_a_tuning_file_from_before_the_loss_units_is_read_in_them(tmp_path):
    """A file without ``curvature_units`` was tuned when the Kronecker methods preconditioned
    with the per-example Fisher: on the autoencoder (784 pixels averaged) their lr, damping
    and κ are read ×784, which takes the same steps now; a file of today is read as it is,
    and other optimizers never change."""
    values = {"kfac": {"lr": 0.1, "damping": 1e-2, "kl_clip": 1e-3, "damping_adaptive": 0.7},
              "adamw": {"lr": 1e-3, "weight_decay": 0.1}}
    path = tmp_path / "fmnist-autoencoder.json"
    path.write_text(json.dumps({"chosen": values}))
    old = tune_module.read_tuning_file(path)
    assert old["kfac"] == pytest.approx({"lr": 78.4, "damping": 7.84, "kl_clip": 0.784,
                                         "damping_adaptive": 0.7})
    assert old["adamw"] == values["adamw"]
    path.write_text(json.dumps({"chosen": values,
                                "curvature_units": tune_module.CURVATURE_UNITS}))
    assert tune_module.read_tuning_file(path) == values
    cnn = tmp_path / "fmnist-cnn.json"
    cnn.write_text(json.dumps({"chosen": values}))
    assert tune_module.read_tuning_file(cnn) == values  # one term per example: unchanged
