"""Benchmark runner, reports and command line on tiny data."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import tekfac
from tekfac.bench import campaign as campaign_module
from tekfac.bench import data as data_module
from tekfac.bench import tune as tune_module
from tekfac.bench.data import CHARACTERS, INPUT_SHAPES, text_windows
from tekfac.bench.optimizers import (
    DEFAULT_HPARAMS,
    OPTIMIZERS,
    QUADRATIC_HPARAMS,
    SECOND_ORDER,
    make_optimizer,
)
from tekfac.bench.report import SUMMARY_KEYS, plot, summarize, write_summary
from tekfac.bench.runner import Split, run
from tekfac.bench.tasks import TASKS
from tekfac.bench.tune import TuningFileError, load_hparams, read_tuning_file, tuning_path
from tekfac.cli import main

ROOT = Path(__file__).resolve().parents[2]  # the repository
CHEAP = ("fmnist-autoencoder", "fmnist-cnn", "fmnist-vgg", "digits-mlp", "text-gpt")


def tiny_split(task, n=8):
    if task.language_model:  # token windows (n, T) and their next tokens
        tokens = torch.randint(0, len(CHARACTERS), (n * INPUT_SHAPES[task.dataset][0] + 1,))
        x, y = text_windows(tokens, INPUT_SHAPES[task.dataset][0])
        return Split(x, y, x[:4], y[:4])
    x = torch.rand(n, *INPUT_SHAPES[task.dataset])
    classes = 100 if task.dataset == "cifar100" else 10
    y = torch.randint(0, classes, (n,))
    return Split(x, y, x[:4], y[:4])


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_builds_and_runs_two_steps(name):
    task = TASKS[name]
    optimizer = "tekfac" if name in CHEAP else "sgd"  # CIFAR models' factors are large
    records = run(task, tiny_split(task), optimizer, DEFAULT_HPARAMS[optimizer], seed=0,
                  epochs=1, batch_size=4, quiet=True)
    assert [r["epoch"] for r in records] == [0, 1]
    final = records[-1]
    assert math.isfinite(final["train_loss"]) and not final["diverged"]
    assert final["step_time_ms"] > 0 and final["wall_time_s"] > 0
    if task.higher_is_better:
        assert 0 <= final["test_metric"] <= 1
    else:
        assert final["test_metric"] > 0


def fake_records():
    recs = []
    for opt, speed in (("sgd", 1.0), ("tekfac", 2.0)):
        for seed in (0, 1):
            for epoch in range(3):
                recs.append(dict(task="fmnist-cnn", optimizer=opt, seed=seed, epoch=epoch,
                                 step=10 * epoch, last=epoch == 2,
                                 train_loss=None if epoch == 0 else 1.0 / (epoch * speed),
                                 test_metric=0.5 + 0.2 * epoch * speed / 2 + 0.01 * seed,
                                 wall_time_s=10.0 * epoch * speed,
                                 step_time_ms=None if epoch == 0 else 5.0 * speed,
                                 diverged=False))
    return recs


def test_summary_schema_and_values(tmp_path):
    rows = write_summary(fake_records(), tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == rows and len(rows) == 2
    for row in rows:
        assert set(SUMMARY_KEYS) <= set(row)
    sgd = next(r for r in rows if r["optimizer"] == "sgd")
    assert sgd["seeds"] == [0, 1] and sgd["epochs"] == 2
    assert sgd["final_test_metric_mean"] == pytest.approx(0.705)
    assert sgd["final_test_metric_std"] == pytest.approx(0.005)
    assert sgd["final_train_loss_mean"] == pytest.approx(0.5)
    # target 0.90 is never reached by sgd (max 0.71); tekfac reaches 0.9 at epoch 2 (40 s)
    assert sgd["time_to_target_s_mean"] is None and sgd["seeds_reaching_target"] == 0
    tek = next(r for r in rows if r["optimizer"] == "tekfac")
    assert tek["time_to_target_s_median"] == pytest.approx(40.0)
    assert tek["step_time_ms_median"] == pytest.approx(10.0)
    assert "| fmnist-cnn | tekfac |" in (tmp_path / "summary.md").read_text()


def test_diverged_runs_are_counted_not_averaged():
    recs = fake_records()
    recs[-1].update(train_loss=math.nan, test_metric=math.nan, diverged=True)
    tek = next(r for r in summarize(recs) if r["optimizer"] == "tekfac")
    assert tek["diverged_runs"] == 1
    assert tek["final_test_metric_mean"] == pytest.approx(0.9)  # seed 0 only


def test_plots_are_written(tmp_path):
    paths = plot(fake_records(), tmp_path)
    assert [p.name for p in paths] == ["fmnist-cnn.png"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shipped_tuning_files_are_the_campaigns():
    """The main job runs at the values benchmark v2's campaign chose (its committed files);
    ``adam``, the previous protocol's baseline, is not in them and takes its defaults."""
    results = ROOT / "docs" / "results" / "campaign-v2" / "tuned"
    for name in ("fmnist-cnn", "fmnist-autoencoder"):
        hparams, source = load_hparams(name)
        assert hparams == {**read_tuning_file(tuning_path(name, results)),
                           "adam": DEFAULT_HPARAMS["adam"]}
        assert source == f"{name}.json (defaults for adam: not in the file)"
        assert hparams["tekfac"] != DEFAULT_HPARAMS["tekfac"]


def test_a_wheel_ships_the_tuning_files(tmp_path):
    """Without them an installed (non-editable) ``tekfac bench`` silently used the defaults."""
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True,
                   capture_output=True)
    (wheel,) = tmp_path.glob("tekfac-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {f"tekfac/bench/tuned/{t}.json" for t in ("fmnist-cnn", "fmnist-autoencoder")}
    assert shipped <= set(names)


def test_previous_protocol_tuning_file_stays_readable():
    """fmnist-vgg's shipped file predates AdamW, Muon, SOAP and Shampoo: those take their
    defaults, so that the task runs (the quick preset once failed on a KeyError for 'adamw')."""
    hparams, source = load_hparams("fmnist-vgg")
    assert set(hparams) == set(OPTIMIZERS)
    assert hparams["adamw"] == DEFAULT_HPARAMS["adamw"]
    assert source == "fmnist-vgg.json (defaults for adamw, muon, shampoo, soap: not in the file)"


def test_second_order_optimizers_are_the_library_methods():
    assert tuple(tekfac.METHODS) == SECOND_ORDER
    assert set(SECOND_ORDER) == {"kfac", "ekfac", "tkfac", "tekfac"}
    assert ("sgd", "adam", "adamw", "muon", "soap", "shampoo", *tekfac.METHODS) == OPTIMIZERS
    assert set(DEFAULT_HPARAMS) == set(OPTIMIZERS)


def test_read_tuning_file_returns_the_chosen_values(tmp_path):
    chosen = {"sgd": {"lr": 0.1}, "tekfac": {"lr": 0.01, "damping": 0.1}}
    path = tuning_path("digits-mlp", tmp_path)
    assert path == tmp_path / "digits-mlp.json"
    path.write_text(json.dumps({"chosen": chosen, "trials": []}))
    assert read_tuning_file(path, ["sgd", "tekfac"]) == chosen
    assert read_tuning_file(path) == chosen
    assert load_hparams("digits-mlp", tmp_path) == (chosen, str(path))


@pytest.mark.parametrize(("content", "message"), [
    (None, "--tuned '{folder}' has no tuning file for digits-mlp (expected digits-mlp.json, "
           "from tekfac tune --out)"),
    ("{not json", "{path} is not a tuning file (no 'chosen' values); write it with tekfac "
                  "tune --out"),
    (json.dumps({"trials": []}), "{path} is not a tuning file"),
    (json.dumps({"chosen": [1, 2]}), "{path} is not a tuning file"),
    (json.dumps({"chosen": {"sgd": {"lr": 0.1}}}),
     "{path} has no values for adam, tekfac; tune them (tekfac tune --optimizers ...) or "
     "leave them out with --optimizers"),
])
def test_read_tuning_file_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "digits-mlp.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TuningFileError) as info:
        read_tuning_file(path, ["sgd", "adam", "tekfac"])
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(message.format(folder=tmp_path, path=path))


def test_load_hparams_rejects_a_malformed_file(tmp_path):
    (tmp_path / "digits-mlp.json").write_text(json.dumps({"chosen": "sgd"}))
    with pytest.raises(TuningFileError, match="is not a tuning file"):
        load_hparams("digits-mlp", tmp_path)
    hparams, source = load_hparams("fmnist-cnn", tmp_path)  # no file: the defaults
    assert hparams == DEFAULT_HPARAMS and source == "defaults (no tuning file)"


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "--tasks", "imagenet"], "invalid choice: 'imagenet'"),
    (["bench", "--optimizers", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["bench", "--data-dir", "/nonexistent/tekfac"], "is not a directory"),
    (["bench", "--epochs", "0"], "--epochs must be at least 1"),
    (["tune", "--task", "nope"], "invalid choice: 'nope'"),
    (["bench", "--tasks", "digits-mlp", "--tuned", "/nonexistent/tekfac"],
     "has no tuning file for digits-mlp"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_missing_data_without_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TEKFAC_DATA", raising=False)
    monkeypatch.setattr(data_module, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "none")
    code = main(["bench", "--tasks", "fmnist-cnn", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Fashion-MNIST not found" in err and "Traceback" not in err


def test_cli_smoke_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["bench", "--preset", "smoke", "--epochs", "1", "--optimizers", "sgd",
                 "tekfac", "--out", str(out), "--quiet", "--evals-per-epoch", "1"])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"runs.jsonl", "summary.json", "summary.md", "config.json", "digits-mlp.png",
            "performance_profile.png"} <= names
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 4  # 2 optimizers × (epoch 0 + epoch 1)
    assert "| digits-mlp | tekfac |" in capsys.readouterr().out


def test_cli_tune_uses_the_given_batch_size(tmp_path, monkeypatch):
    batch_sizes = []

    def recording_run(task, split, optimizer, hparams, seed, epochs, batch_size, *args, **kw):
        batch_sizes.append(batch_size)
        return run(task, split, optimizer, hparams, seed, epochs, batch_size, *args, **kw)

    monkeypatch.setattr(tune_module, "run", recording_run)
    out = tmp_path / "tuned.json"
    assert main(["tune", "--task", "digits-mlp", "--optimizers", "sgd", "--batch-size", "64",
                 "--train-size", "256", "--epochs", "1", "--trials", "2", "--out",
                 str(out)]) == 0
    assert batch_sizes == [64] * 2
    assert json.loads(out.read_text())["budget"]["batch_size"] == 64


def test_cli_bench_passes_its_settings_to_each_run(tmp_path, monkeypatch):
    calls = []

    def recording_run(task, split, optimizer, hparams, seed, epochs, batch_size, device, quiet,
                      emit, **kw):
        calls.append((task.name, optimizer, seed, epochs, batch_size, device, quiet,
                      len(split.train_x)))
        return run(task, split, optimizer, hparams, seed, epochs, batch_size, device, quiet,
                   emit, **kw)

    monkeypatch.setattr(campaign_module, "run", recording_run)
    out = tmp_path / "res"
    assert main(["bench", "--preset", "smoke", "--epochs", "1", "--seeds", "2", "--optimizers",
                 "sgd", "adam", "--batch-size", "32", "--train-size", "300", "--out", str(out),
                 "--quiet"]) == 0
    assert calls == [("digits-mlp", opt, seed, 1, 32, "cpu", True, 300)
                     for opt in ("sgd", "adam") for seed in (0, 1)]
    assert len((out / "runs.jsonl").read_text().splitlines()) == 4 * (1 + 4)  # 4 evaluations


def test_the_tasks_training_size_is_its_budget_unless_overridden(tmp_path, monkeypatch):
    sizes = []

    def recording_run(task, split, optimizer, hparams, seed, epochs, *args, **kw):
        sizes.append((epochs, len(split.train_x)))
        return run(task, split, optimizer, hparams, seed, epochs, *args, **kw)

    small = dataclasses.replace(TASKS["digits-mlp"], epochs=1, train_size=200)
    monkeypatch.setitem(TASKS, "digits-mlp", small)
    monkeypatch.setattr(campaign_module, "run", recording_run)
    monkeypatch.setattr(tune_module, "run", recording_run)
    common = ["--optimizers", "sgd", "--batch-size", "50"]
    assert main(["bench", "--preset", "smoke", "--seeds", "1", "--out", str(tmp_path / "a"),
                 "--quiet", *common]) == 0
    assert main(["bench", "--preset", "smoke", "--seeds", "1", "--train-size", "100", "--out",
                 str(tmp_path / "b"), "--quiet", *common]) == 0
    assert main(["tune", "--task", "digits-mlp", "--trials", "1", "--out",
                 str(tmp_path / "t.json"), *common]) == 0
    assert sizes == [(1, 200), (1, 100), (1, 200)]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["train_size"] == {"digits-mlp": 200}
    assert json.loads((tmp_path / "t.json").read_text())["budget"]["train_size"] == 200


def test_python_dash_m_runs_the_same_command_line():
    result = subprocess.run([sys.executable, "-m", "tekfac", "bench", "--epochs", "0"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: tekfac ")
    assert "tekfac: error: --epochs must be at least 1, got 0" in result.stderr


def test_cli_bench_reads_hyper_parameters_from_tuned_folder(tmp_path):
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "digits-mlp.json").write_text(json.dumps({"chosen": {"sgd": {"lr": 0.0123}}}))
    out = tmp_path / "res"
    assert main(["bench", "--preset", "smoke", "--epochs", "1", "--optimizers", "sgd",
                 "--tuned", str(tuned), "--out", str(out), "--quiet"]) == 0
    hparams = json.loads((out / "config.json").read_text())["hparams"]["digits-mlp"]
    assert hparams == {"values": {"sgd": {"lr": 0.0123}},
                       "source": str(tuned / "digits-mlp.json")}


def test_cli_bench_quadratic_rule_runs_untuned_without_a_schedule(tmp_path):
    out = tmp_path / "res"
    assert main(["bench", "--preset", "smoke", "--epochs", "1", "--optimizers", "tekfac",
                 "--step-rule", "quadratic", "--out", str(out), "--quiet"]) == 0
    hparams = json.loads((out / "config.json").read_text())["hparams"]["digits-mlp"]
    assert hparams["values"]["tekfac"] == QUADRATIC_HPARAMS
    assert "quadratic rule, untuned" in hparams["source"]
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("last")]
    assert final and not final[0]["diverged"]
    assert final[0]["test_metric"] > records[0]["test_metric"]  # accuracy: it learned
    opt = make_optimizer("tekfac", nn.Linear(3, 2), QUADRATIC_HPARAMS, "cross_entropy", 0.0)
    assert opt.step_rule == "quadratic" and opt.param_groups[0]["kl_clip"] is None
    assert opt.damping_adaptation is not None and opt.param_groups[0]["lr"] == 1.0
    config = opt.preconditioner.config
    assert (config.cov_update_freq, config.eigen_update_freq, config.damping) == (1, 5, 0.1)


@pytest.mark.parametrize(("content", "message"), [
    ({"chosen": {"sgd": {"lr": 0.1}}}, "has no values for tekfac"),
    (["not", "a", "tuning", "file"], "is not a tuning file"),
    ({"chosen": "sgd tekfac"}, "is not a tuning file"),
])
def test_cli_bench_rejects_incomplete_tuning_file(tmp_path, capsys, content, message):
    (tmp_path / "digits-mlp.json").write_text(json.dumps(content))
    with pytest.raises(SystemExit) as info:
        main(["bench", "--preset", "smoke", "--optimizers", "sgd", "tekfac",
              "--tuned", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_resume_keeps_finished_runs_and_reruns_the_rest(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["bench", "--preset", "smoke", "--epochs", "1", "--seeds", "2", "--optimizers",
            "sgd", "--out", str(out), "--evals-per-epoch", "1", "--quiet"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["epoch"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    records[1]["train_loss"] = 123.0  # marks the finished run: it must be kept, not rerun
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    with pytest.raises(SystemExit) as info:  # no silent overwrite
        main(argv)
    assert info.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="epochs differ"):
        main([*argv, "--resume", "--epochs", "2"])
    assert main([*argv, "--resume"]) == 0
    resumed = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["epoch"]) for r in resumed] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert resumed[1]["train_loss"] == 123.0
    config = json.loads((out / "config.json").read_text())
    assert config["command"].endswith("--quiet") and len(config["resumed_by"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["seeds"] == [0, 1]


def test_load_hparams_lays_later_folders_over_earlier_ones(tmp_path):
    campaign, retune, empty = (tmp_path / n for n in ("campaign", "retune", "empty"))
    for folder, chosen in ((campaign, {"sgd": {"lr": 0.1}, "kfac": {"lr": 0.2}}),
                           (retune, {"kfac": {"lr": 0.3}}), (empty, None)):
        folder.mkdir()
        if chosen is not None:
            tuning_path("digits-mlp", folder).write_text(json.dumps({"chosen": chosen}))
    hparams, source = load_hparams("digits-mlp", [campaign, retune, empty])
    assert hparams == {"sgd": {"lr": 0.1}, "kfac": {"lr": 0.3}}
    assert source == (f"{tuning_path('digits-mlp', campaign)}: sgd; "
                      f"{tuning_path('digits-mlp', retune)}: kfac")
    assert load_hparams("digits-mlp", [retune, empty])[1] == str(tuning_path("digits-mlp", retune))
    with pytest.raises(SystemExit):  # together they lack tekfac; each folder needs the file
        main(["bench", "--preset", "smoke", "--optimizers", "sgd", "tekfac",
              "--tuned", str(campaign), str(retune)])
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "smoke", "--optimizers", "sgd", "kfac",
              "--tuned", str(campaign), str(empty)])


def test_cli_reuse_takes_the_runs_trained_alike_and_trains_the_others(tmp_path, capsys):
    """A campaign retuning kfac reuses the earlier campaign's sgd runs, record for record,
    and trains kfac (its values differ) and the seed the earlier one did not run."""
    tuned, retune, first = tmp_path / "tuned", tmp_path / "retune", tmp_path / "first"
    for folder, chosen in ((tuned, {"sgd": {"lr": 0.05}, "kfac": {"lr": 0.01, "damping": 0.1}}),
                           (retune, {"kfac": {"lr": 0.02, "damping": 0.1}})):
        folder.mkdir()
        tuning_path("digits-mlp", folder).write_text(json.dumps({"chosen": chosen}))
    common = ["bench", "--preset", "smoke", "--epochs", "1", "--optimizers", "sgd", "kfac",
              "--evals-per-epoch", "1", "--quiet"]
    assert main([*common, "--tuned", str(tuned), "--out", str(first)]) == 0
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "x"), "--reuse", str(retune)])
    assert "holds no campaign" in capsys.readouterr().err
    again = tmp_path / "again"
    assert main([*common, "--seeds", "2", "--tuned", str(tuned), str(retune), "--out",
                 str(again), "--reuse", str(first)]) == 0
    assert "reusing 1 finished runs" in capsys.readouterr().out
    earlier = [json.loads(line) for line in (first / "runs.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (again / "runs.jsonl").read_text().splitlines()]
    assert records[:2] == [r for r in earlier if r["optimizer"] == "sgd"]
    assert {(r["optimizer"], r["seed"]) for r in records[2:]} == {("sgd", 1), ("kfac", 0),
                                                                    ("kfac", 1)}
    config = json.loads((again / "config.json").read_text())
    assert config["reused"] == [{"folder": str(first), "runs": [["digits-mlp", "sgd", 0]]}]
    assert {r["optimizer"] for r in json.loads((again / "summary.json").read_text())} == {
        "sgd", "kfac"}


def test_cli_data_parallel_run(tmp_path):
    """--nproc 2: two gloo ranks on CPU; rank 0 records the run."""
    out = tmp_path / "dp"
    code = main(["bench", "--preset", "smoke", "--epochs", "1", "--optimizers", "tekfac",
                 "--nproc", "2", "--out", str(out), "--quiet", "--evals-per-epoch", "1"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["processes"] == 2
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert 0.5 < records[-1]["test_metric"] <= 1  # it learned (10 % is chance)


def test_cli_rejects_indivisible_batch(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "smoke", "--nproc", "3", "--batch-size", "128"])
    assert "not divisible" in capsys.readouterr().err
