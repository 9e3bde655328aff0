"""``tekfac scaling``: the evaluation grid, the stopping rules, the selection, the seeds, the
reports and resuming (issue #29)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math

import pytest
import torch

from tekfac.bench import scaling as scaling_module
from tekfac.bench.data import Dataset
from tekfac.bench.scaling import evaluation_steps, main_scaling, space, summarize
from tekfac.bench.search import Range, draw
from tekfac.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("optuna") is None,
                                reason="optuna (bench extra) not installed")


def test_evaluation_steps_are_a_geometric_grid_ending_at_the_budget():
    steps = evaluation_steps(600)
    assert steps[:8] == [1, 2, 3, 4, 5, 6, 7, 8] and steps[-1] == 600
    assert steps == sorted(set(steps))
    ratios = [b / a for a, b in itertools.pairwise(steps[8:])]
    assert max(ratios) <= 2 ** (1 / 8) * 1.07 and min(ratios) >= 1.03
    assert evaluation_steps(1) == [1]


def test_the_windows_hold_the_tuned_rate_and_twice_the_linear_scaling_rule():
    assert space({"lr": 0.1, "weight_decay": 0.01}, 128) == {"lr": Range(0.05, 0.2)}
    assert space({"lr": 0.1}, 2048) == {"lr": Range(0.05, 3.2)}
    assert space({"lr": 0.1}, 32) == {"lr": Range(0.0125, 0.2)}
    assert space({"lr": 0.4, "damping": 1e-3, "kl_clip": 1e-4}, 512) == {
        "lr": Range(0.2, 3.2), "damping": Range(1e-4, 1e-2)}
    unit = [p["lr"] for p in draw("sgd", 4, space=space({"lr": 1.0}, 128))]
    wide = [p["lr"] for p in draw("sgd", 4, space=space({"lr": 1.0}, 2048))]
    # the same Sobol points of the unit interval, mapped into each window (log scale)
    assert [math.log(u / 0.5) / math.log(4) for u in unit] == pytest.approx(
        [math.log(w / 0.5) / math.log(64) for w in wide])


def _fake_campaign(monkeypatch, steps_to_reach):
    """``main_scaling`` on a random data set with a fake ``run``: the validation metric of a
    run (accuracy, digits-mlp) crosses the target 0.95 at ``steps_to_reach(hparams, batch,
    seed, split)`` (None: never); the stop rule is applied as the runner does. Returns the
    calls: (batch, lr, seed, evaluation set size, steps trained)."""
    calls = []

    def fake_run(task, split, optimizer, hparams, seed, epochs, batch_size, device, quiet, *,
                 steps, eval_steps, stop_when, warmup_fraction):
        reach = steps_to_reach(hparams, batch_size, seed, len(split.eval_x))
        records = [dict(step=0, test_metric=0.1, wall_time_s=0.0, diverged=False,
                        step_time_ms=None)]
        for step in eval_steps:
            metric = 0.96 if reach is not None and step >= reach else 0.5
            records.append(dict(step=step, test_metric=metric, wall_time_s=step / 10,
                                diverged=False, step_time_ms=float(batch_size)))
            if step == steps or stop_when(records[-1]):
                break
        calls.append((batch_size, hparams["lr"], seed, len(split.eval_x), records[-1]["step"]))
        return records

    monkeypatch.setattr(scaling_module, "run", fake_run)
    monkeypatch.setattr(scaling_module, "load_dataset", lambda *a: Dataset(
        "digits", torch.rand(100, 1, 8, 8), torch.zeros(100, dtype=torch.long),
        torch.rand(30, 1, 8, 8), torch.zeros(30, dtype=torch.long), 10))
    return calls


def _scaling(out, **kw):
    settings = dict(tasks=["digits-mlp"], batch_sizes=[16, 64], optimizers=["sgd"], trials=4,
                    seeds=3, steps=100, data_dir=None, device="cpu", out=out, resume=False,
                    tuned=(), quiet=True, command="cmd")
    return main_scaling(**{**settings, **kw})


def test_trials_stop_at_the_target_and_at_the_best_steps_so_far(tmp_path, monkeypatch):
    """The fewer steps the smaller the rate (above 0.05 never); the trial with the
    fewest steps wins (the first of a tie); a trial stops at the target and also at the best
    steps so far. The rates are drawn in each batch size's window around digits-mlp's default
    0.05 (no tuning file)."""

    def reach(hparams, batch, seed, n_eval):
        lr = hparams["lr"]
        return None if lr > 0.05 else max(1, round(lr * 16000 / batch))

    calls = _fake_campaign(monkeypatch, reach)
    _scaling(tmp_path / "out")
    trials = [json.loads(line) for line in (tmp_path / "out" / "trials.jsonl").read_text()
              .splitlines()]
    assert [(t["batch_size"], t["index"]) for t in trials] == [(16, i) for i in range(4)] + [
        (64, i) for i in range(4)]
    for batch in (16, 64):
        own = [t for t in trials if t["batch_size"] == batch]
        best = math.inf
        for t, call in zip(own, [c for c in calls if c[0] == batch]):
            cap = min(best, 100)
            assert t["stopped_at"] == cap and call[4] <= cap  # never trained past the best
            expected = reach(t["params"], batch, 0, 0)
            if expected is not None and expected <= cap:
                assert t["steps_to_target"] == min(s for s in evaluation_steps(100)
                                                   if s >= expected)
                best = min(best, t["steps_to_target"])
            else:
                assert t["steps_to_target"] is None
    assert any(t["steps_to_target"] is None and reach(t["params"], t["batch_size"], 0, 0)
               for t in trials)  # a trial the best steps so far stopped before its target
    for batch in (16, 64):
        lrs = [p["lr"] for p in draw("sgd", 4, space=space({"lr": 0.05}, batch))]
        assert [t["params"]["lr"] for t in trials if t["batch_size"] == batch] == lrs
        assert any(lr > 0.05 for lr in lrs) and any(lr <= 0.05 for lr in lrs)
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text()
            .splitlines()]
    assert [(r["batch_size"], r["seed"]) for r in runs] == [(16, s) for s in range(3)] + [
        (64, s) for s in range(3)]
    for batch in (16, 64):
        reached = [t for t in trials if t["batch_size"] == batch and t["steps_to_target"]]
        best = min(reached, key=lambda t: (t["steps_to_target"], t["index"]))
        assert all(r["params"] == best["params"] for r in runs if r["batch_size"] == batch)
    # the trials are evaluated on the validation split (10 of 100), the seeds on the test set
    assert [(c[2], c[3]) for c in calls] == [(0, 10)] * 4 + [(0, 30), (1, 30), (2, 30)] + [
        (0, 10)] * 4 + [(0, 30), (1, 30), (2, 30)]
    rows = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert [(r["batch_size"], r["seeds_reaching"]) for r in rows] == [(16, 3), (64, 3)]
    assert (tmp_path / "out" / "digits-mlp.png").read_bytes()[:4] == b"\x89PNG"
    assert "| sgd |" in (tmp_path / "out" / "scaling.md").read_text()


def test_resume_runs_only_what_is_missing_and_refuses_other_settings(tmp_path, monkeypatch):
    calls = _fake_campaign(monkeypatch, lambda h, b, s, n: 10)
    out = tmp_path / "out"
    _scaling(out)
    first = len(calls)
    assert first == 2 * (4 + 3)
    lines = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # the last seed was cut
    _scaling(out, resume=True)
    assert len(calls) == first + 1 and calls[-1][:3] == (64, calls[-1][1], 2)
    config = json.loads((out / "config.json").read_text())
    assert config["resumed_by"] == ["cmd"]
    with pytest.raises(SystemExit, match="trials differ"):
        _scaling(out, resume=True, trials=8)
    with pytest.raises(SystemExit, match="no step budget"):
        _scaling(tmp_path / "other", steps=None)


def test_the_median_over_seeds_counts_a_miss_as_infinitely_many_steps():
    def runs(steps):
        return [dict(task="digits-mlp", optimizer="sgd", batch_size=16, seed=i, params={},
                     steps_to_target=s, time_to_target_s=None if s is None else s / 10,
                     step_time_ms=1.0) for i, s in enumerate(steps)]

    assert summarize(runs([10, None, 20]))[0]["steps_to_target_median"] == 20
    assert summarize(runs([10, None, None]))[0]["steps_to_target_median"] is None
    assert summarize(runs([10, 30, 20]))[0]["seeds_reaching"] == 3


def test_cli_scaling_trains_a_tiny_campaign_end_to_end(tmp_path, capsys):
    out = tmp_path / "scaling"
    argv = ["scaling", "--tasks", "digits-mlp", "--steps", "20", "--batch-sizes", "16", "32",
            "--optimizers", "sgd", "kfac", "--trials", "2", "--seeds", "1", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "scaling.json").read_text())
    assert {(r["optimizer"], r["batch_size"]) for r in rows} == {
        (o, b) for o in ("sgd", "kfac") for b in (16, 32)}
    assert "B=16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(argv)  # no silent overwrite
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["scaling", "--tasks", "digits-mlp", "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err
