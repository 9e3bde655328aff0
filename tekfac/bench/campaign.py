"""``tekfac bench``: train every (task, optimizer, seed) and write the comparison's reports.

A campaign takes its tasks, seeds and epochs from a preset (:data:`PRESETS`) unless given,
the hyper-parameters from the tuning files (:func:`tekfac.bench.tune.load_hparams`), and
trains each run with :func:`tekfac.bench.runner.run`. Into its output folder it writes
``config.json`` (the settings, the hyper-parameters and their source, the machine), then
``runs.jsonl`` (one record per evaluation, several per epoch, appended as the runs go), and
at the end ``summary.json``, ``summary.md``, one plot per task and the performance profile
``performance_profile.png`` (:mod:`tekfac.bench.report`). Runs train on the whole training
set minus the validation split (the data the trials trained on, see
:func:`tekfac.bench.tune.tuning_split`) and are evaluated on the test set.

A campaign can be resumed in the same folder with the same settings: its finished runs are
kept and only the others are trained. ``reuse`` takes another campaign's finished runs that
this one would train alike (:func:`_reused`), so that a retune of some optimizers reruns only
theirs. Inside a process group every rank trains every run
(the runner splits each minibatch) and rank 0 alone records and reports.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from tekfac.bench.data import Dataset, load_dataset
from tekfac.bench.optimizers import OPTIMIZERS, QUADRATIC_HPARAMS, SECOND_ORDER
from tekfac.bench.processes import flushes_denormals
from tekfac.bench.report import (
    finished_records,
    markdown_table,
    performance_profile,
    plot,
    summarize,
    write_summary,
)
from tekfac.bench.runner import Split, run
from tekfac.bench.tasks import TASKS, Task
from tekfac.bench.tune import TUNED_DIR, load_hparams, tuning_split

#: The campaigns ``tekfac bench --preset`` names: tasks, optimizers, number of seeds. Every
#: run trains for its task's fixed budget (``Task.epochs``, the budget it was tuned at) unless
#: ``--epochs`` overrides it. ``quick`` (the main job, 10-15 min on a 2-core CPU): the four
#: optimizers the issue names, one seed; ``full``: benchmark v2's final runs, the 3 seeds of
#: the nine optimizers its campaign tuned (all but the previous protocol's ``adam``) on the
#: two tasks it tuned.
PRESETS: dict[str, dict] = {
    "smoke": dict(tasks=["digits-mlp"], optimizers=["sgd", "adamw", "kfac", "tekfac"],
                  seeds=1),
    "quick": dict(tasks=["fmnist-cnn", "fmnist-autoencoder"],
                  optimizers=["sgd", "adamw", "kfac", "tekfac"], seeds=1),
    "full": dict(tasks=["fmnist-cnn", "fmnist-autoencoder"],
                 optimizers=[o for o in OPTIMIZERS if o != "adam"], seeds=3),
}


def main_bench(*, preset: str, tasks: list[str] | None, optimizers: list[str] | None,
               seeds: int | None, epochs: int | None, batch_size: int, train_size: int | None,
               data_dir: str | None, device: str, out: Path | None, resume: bool,
               tuned: Sequence[Path], quiet: bool, command: str, reuse: Path | None = None,
               evals_per_epoch: int = 4, step_rule: str = "fixed") -> None:
    """``tekfac bench``: run a campaign and write its outputs.

    Args:
        preset: Key of :data:`PRESETS`; gives ``tasks``, ``optimizers`` and ``seeds`` not
            given.
        tasks: Task names (keys of :data:`tekfac.bench.tasks.TASKS`), or None.
        optimizers: Optimizer names, each trained on every task and seed, or None.
        seeds: Number of seeds (0, 1, ...), or None.
        epochs: Epochs per run, or None: each task's budget (``Task.epochs``).
        batch_size: Global minibatch size.
        train_size: Train on the first ``train_size`` training examples only, or None: each
            task's budget (``Task.train_size``; None there: all).
        data_dir: Folder of the data sets (see :func:`tekfac.bench.data.load_dataset`).
        device: Torch device of the runs.
        out: Output folder (None: ``results/<timestamp>``).
        resume: Keep the finished runs in ``out`` and train the others.
        tuned: Folders of the tuning files, a later one's values replacing an earlier one's
            (:func:`~tekfac.bench.tune.load_hparams`; empty: the shipped
            ``tekfac/bench/tuned/``).
        quiet: Plain log lines instead of progress bars.
        command: The command line, recorded in ``config.json``.
        reuse: Folder of an earlier campaign whose finished runs with this campaign's task
            settings and hyper-parameters are taken instead of trained (:func:`_reused`).
        evals_per_epoch: Test-set evaluations per epoch (time to target's resolution).
        step_rule: ``"quadratic"``: the Kronecker methods take the quadratic-model step with
            :data:`~tekfac.bench.optimizers.QUADRATIC_HPARAMS`, whatever the tuning files say
            (docs/design.md §4.7).

    Raises:
        tekfac.bench.data.DataError: A data set cannot be loaded.
        SystemExit: ``resume`` with settings that differ from the earlier invocation's.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    defaults = PRESETS[preset]
    tasks = tasks or defaults["tasks"]
    optimizers = optimizers or defaults["optimizers"]
    seeds = range(seeds or defaults["seeds"])
    budgets = {t: epochs or TASKS[t].epochs for t in tasks}
    sizes = {t: train_size or TASKS[t].train_size for t in tasks}
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out or Path("results") / stamp
    datasets = {TASKS[t].dataset: load_dataset(TASKS[t].dataset, data_dir) for t in tasks}
    hparams = {t: load_hparams(t, tuned or TUNED_DIR) for t in tasks}
    if step_rule == "quadratic":
        hparams = {t: ({**h, **{m: dict(QUADRATIC_HPARAMS) for m in SECOND_ORDER}},
                       f"{s}; Kronecker methods: quadratic rule, untuned")
                   for t, (h, s) in hparams.items()}
    world = dist.get_world_size() if dist.is_initialized() else 1
    settings = dict(tasks=tasks, optimizers=optimizers, seeds=list(seeds), epochs=budgets,
                    batch_size=batch_size, train_size=sizes,
                    evals_per_epoch=evals_per_epoch,
                    warmup_fraction={t: TASKS[t].warmup_fraction for t in tasks},
                    hparams={t: {"values": h, "source": s} for t, (h, s) in hparams.items()})
    config = dict(command=command, **settings, device=device, processes=world,
                  machine=dict(platform=platform.platform(), processor=platform.machine(),
                               cpus=os.cpu_count(), torch=torch.__version__,
                               threads=torch.get_num_threads(),
                               flush_denormal=flushes_denormals(device)))
    records = _resumed(out, settings, config) if resume and rank == 0 else []
    if reuse is not None and rank == 0:
        records += _reused(reuse, settings, config, records)
    done = {(r["task"], r["optimizer"], r["seed"]) for r in records}
    if dist.is_initialized():  # every rank skips the same runs
        shared = [sorted(done)]
        dist.broadcast_object_list(shared, src=0)
        done = {tuple(key) for key in shared[0]}

    def train(emit: Callable[[dict], None] | None) -> None:
        for name in tasks:
            task = TASKS[name]
            _run_task(task, datasets[task.dataset], hparams[name][0], optimizers, seeds,
                      epochs=budgets[name], batch_size=batch_size, train_size=sizes[name],
                      device=device, quiet=quiet, emit=emit, done=done,
                      evals_per_epoch=evals_per_epoch)

    if rank == 0:
        _record_and_report(out, config, records, train)
    else:  # the other ranks train; rank 0 records and reports
        train(None)
    if dist.is_initialized():
        dist.barrier()  # rank 0 writes the reports; leave together


def _record_and_report(out: Path, config: dict, records: list[dict],
                       train: Callable[[Callable[[dict], None]], None]) -> None:
    """Writes ``config.json``; ``runs.jsonl`` (the kept ``records``, then each new record of
    ``train(emit)`` as it comes); then the summary and the plots, and prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with (out / "runs.jsonl").open("w") as log:
        def emit(record: dict) -> None:
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()

        for record in records:  # the kept runs of an earlier invocation
            log.write(json.dumps(record) + "\n")
        start = time.perf_counter()
        train(emit)
    write_summary(records, out)
    plot(records, out)
    performance_profile(summarize(records), out / "performance_profile.png")
    print(markdown_table(json.loads((out / "summary.json").read_text())))
    print(f"total {time.perf_counter() - start:.0f}s; results in {out}")


def _resumed(out: Path, settings: dict, config: dict) -> list[dict]:
    """The records of the finished runs in ``out`` (those with a last record); refuses settings
    that differ from the earlier invocation's. Adds the earlier commands to ``config``."""
    earlier = json.loads((out / "config.json").read_text())
    changed = [k for k, v in settings.items() if earlier.get(k) != json.loads(json.dumps(v))]
    if changed:
        raise SystemExit(f"tekfac: cannot resume {out}: {', '.join(changed)} differ from the "
                         "earlier run's config.json; rerun with its settings or use a new --out")
    config["resumed_by"] = [*earlier.get("resumed_by", []), config["command"]]
    config["reused"] = earlier.get("reused", [])
    config["command"] = earlier["command"]
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()
               if line.strip()]
    return finished_records(records)


def _reused(folder: Path, settings: dict, config: dict, kept: list[dict]) -> list[dict]:
    """The records of the finished runs of the campaign in ``folder`` that this one would
    train alike, and that ``kept`` lacks: a task, optimizer and seed of this campaign, the same
    device, processes, batch size and evaluations per epoch, the task's same epochs, training
    size and warm-up, and the optimizer's same hyper-parameter values. Appends the runs taken
    to ``config["reused"]`` and prints how many."""
    earlier = json.loads((folder / "config.json").read_text())
    path = folder / "runs.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    now = json.loads(json.dumps(settings))  # the JSON form earlier's values were read in

    def alike(task: str, optimizer: str) -> bool:
        same = all(earlier.get(k) == config[k] for k in ("device", "processes")) and all(
            earlier.get(k) == now[k] for k in ("batch_size", "evals_per_epoch"))
        return same and all(earlier.get(k, {}).get(task) == now[k][task]
                            for k in ("epochs", "train_size", "warmup_fraction")) and (
            earlier["hparams"].get(task, {}).get("values", {}).get(optimizer)
            == now["hparams"][task]["values"].get(optimizer))

    have = {(r["task"], r["optimizer"], r["seed"]) for r in kept}
    records = [r for r in finished_records([json.loads(line) for line in lines if line.strip()])
               if r["task"] in now["tasks"] and r["optimizer"] in now["optimizers"]
               and r["seed"] in now["seeds"] and (r["task"], r["optimizer"], r["seed"]) not in have
               and alike(r["task"], r["optimizer"])]
    runs = sorted({(r["task"], r["optimizer"], r["seed"]) for r in records})
    config.setdefault("reused", []).append(dict(folder=str(folder), runs=[list(k) for k in runs]))
    print(f"tekfac bench: reusing {len(runs)} finished runs of {folder}", flush=True)
    return records


def _run_task(task: Task, data: Dataset, hparams: dict[str, dict[str, float]],
              optimizers: Sequence[str], seeds: range, *, epochs: int, batch_size: int,
              train_size: int | None, device: str, quiet: bool,
              emit: Callable[[dict], None] | None,
              done: Collection[tuple[str, str, int]] = frozenset(),
              evals_per_epoch: int = 4) -> None:
    """Trains ``task`` with each optimizer and seed, skipping the (task, optimizer, seed) runs
    in ``done``; ``emit`` receives each record (None on the ranks that do not record)."""
    train = tuning_split(data, train_size)  # the trials' training data, without validation
    split = Split(train.train_x, train.train_y, data.test_x, data.test_y)
    for optimizer in optimizers:
        for seed in seeds:
            if (task.name, optimizer, seed) in done:
                continue
            run(task, split, optimizer, hparams[optimizer], seed, epochs, batch_size, device,
                quiet, emit, evals_per_epoch=evals_per_epoch,
                warmup_fraction=task.warmup_fraction, measure_memory=True)
