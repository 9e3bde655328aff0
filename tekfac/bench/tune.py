"""Hyper-parameter tuning with the same budget for every optimizer.

Each optimizer gets :data:`TRIALS` grid points, each trained for the same number of epochs on
the same training subset and scored on a validation split held out of the training set (never
the test set). First-order methods spend their trials on a finer learning-rate grid; the
Kronecker methods on a 3×3 grid of learning rate × damping spanning docs/design.md §6's range.
The chosen values and every trial are written to ``tekfac/bench/tuned/<task>.json``, which
:func:`load_hparams` reads for the benchmark. This module owns that file format: a JSON object
whose ``"chosen"`` member maps each optimizer to its values; :func:`read_tuning_file` reads and
validates one.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from pathlib import Path

from tekfac.bench.data import load_dataset, split_validation
from tekfac.bench.optimizers import DEFAULT_HPARAMS, SECOND_ORDER
from tekfac.bench.runner import Split, run
from tekfac.bench.tasks import TASKS, Task

TUNED_DIR = Path(__file__).parent / "tuned"
TRIALS = 9


def _grids(sgd: tuple[float, ...], adam: tuple[float, ...], lrs: tuple[float, ...],
           dampings: tuple[float, ...]) -> dict[str, list[dict[str, float]]]:
    second = [{"lr": lr, "damping": d} for lr, d in itertools.product(lrs, dampings)]
    return {"sgd": [{"lr": v} for v in sgd], "adam": [{"lr": v} for v in adam],
            **{m: second for m in SECOND_ORDER}}


#: The default grid, and per-task grids where a first tuning run put optima on the default
#: grid's edge (recorded in docs/results/README.md). The autoencoder's loss is a mean over
#: 784 pixels, which scales its Fisher by 1/784² (docs/design.md §1), hence its smaller dampings.
SGD_LRS = (0.003, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
ADAM_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
GRIDS = _grids(sgd=SGD_LRS, adam=ADAM_LRS, lrs=(0.01, 0.03, 0.1), dampings=(0.01, 0.1, 1.0))
TASK_GRIDS = {
    "fmnist-cnn": _grids(sgd=(0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0),
                         adam=(2e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2, 2e-2),
                         lrs=(0.03, 0.1, 0.3), dampings=(1e-3, 1e-2, 1e-1)),
    "fmnist-autoencoder": _grids(sgd=(0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0),
                                 adam=(2e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2, 2e-2),
                                 lrs=(0.03, 0.1, 0.3), dampings=(1e-4, 1e-3, 1e-2)),
    "fmnist-vgg": _grids(sgd=SGD_LRS, adam=ADAM_LRS, lrs=(0.01, 0.03, 0.1),
                         dampings=(1e-3, 1e-2, 1e-1)),
}


def grid(task: str) -> dict[str, list[dict[str, float]]]:
    """The tuning grid of ``task``: :data:`TRIALS` points per optimizer."""
    return TASK_GRIDS.get(task, GRIDS)


class TuningFileError(ValueError):
    """A tuning file is missing, is not a tuning file, or lacks values for an optimizer."""


def tuning_path(task: str, folder: Path = TUNED_DIR) -> Path:
    """The tuning file of ``task`` in ``folder``: ``folder/<task>.json``."""
    return folder / f"{task}.json"


def read_tuning_file(path: Path, optimizers: Iterable[str] = ()) -> dict[str, dict[str, float]]:
    """Reads and validates a tuning file as written by ``tekfac tune``.

    Args:
        path: The file, ``<folder>/<task>.json`` (see :func:`tuning_path`).
        optimizers: Optimizers that must have values in the file.

    Returns:
        The file's ``"chosen"`` values: optimizer name -> hyper-parameters.

    Raises:
        TuningFileError: The file does not exist, is not JSON with a ``"chosen"`` object, or
            has no values for some of ``optimizers``; the message says how to fix it.
    """
    if not path.is_file():
        raise TuningFileError(f"--tuned {str(path.parent)!r} has no tuning file for {path.stem} "
                              f"(expected {path.name}, from tekfac tune --out)")
    try:
        chosen = json.loads(path.read_text())["chosen"]
    except (ValueError, KeyError, TypeError):
        chosen = None
    if not isinstance(chosen, dict):
        raise TuningFileError(f"{path} is not a tuning file (no 'chosen' values); write it with "
                              "tekfac tune --out")
    missing = [o for o in optimizers if o not in chosen]
    if missing:
        raise TuningFileError(f"{path} has no values for {', '.join(missing)}; tune them (tekfac "
                              "tune --optimizers ...) or leave them out with --optimizers")
    return chosen


def load_hparams(task: str, folder: Path = TUNED_DIR) -> tuple[dict[str, dict[str, float]], str]:
    """The tuned hyper-parameters of ``task`` from ``folder/<task>.json`` and their source
    (the file; its name only for the shipped folder), or the defaults if there is no file.

    Raises:
        TuningFileError: The file exists but is not a tuning file (see :func:`read_tuning_file`).
    """
    path = tuning_path(task, folder)
    if path.is_file():
        return read_tuning_file(path), str(path.name if folder == TUNED_DIR else path)
    return DEFAULT_HPARAMS, "defaults (no tuning file)"


def score(task: Task, records: list[dict]) -> float:
    """Final validation metric, oriented so that larger is better; -inf if diverged."""
    final = records[-1]
    if final["diverged"] or not math.isfinite(final["test_metric"]):
        return -math.inf
    return final["test_metric"] if task.higher_is_better else -final["test_metric"]


def tune(task: Task, optimizers: list[str], epochs: int, train_size: int | None,
         data_dir: str | None = None, val_fraction: float = 0.1, seed: int = 0,
         batch_size: int = 128, device: str = "cpu", quiet: bool = True) -> dict:
    """Run every grid point of every optimizer; return the chosen values and all trials."""
    data = load_dataset(task.dataset, data_dir)
    train_x, train_y, val_x, val_y = split_validation(data.train_x, data.train_y, val_fraction,
                                                      seed)
    if train_size is not None:
        train_x, train_y = train_x[:train_size], train_y[:train_size]
    split = Split(train_x, train_y, val_x, val_y)
    trials, chosen = [], {}
    for optimizer in optimizers:
        best = None
        for hparams in grid(task.name)[optimizer]:
            records = run(task, split, optimizer, hparams, seed, epochs, batch_size, device,
                          quiet=quiet)
            s = score(task, records)
            final = records[-1]
            trials.append(dict(optimizer=optimizer, **hparams, val_metric=final["test_metric"],
                               train_loss=final["train_loss"], diverged=final["diverged"]))
            print(f"tune {task.name} {optimizer} {hparams}: validation {task.metric} "
                  f"{final['test_metric']:.4f}", flush=True)
            if best is None or s > best[0]:
                best = (s, hparams)
        chosen[optimizer] = best[1]
    return dict(task=task.name, metric=f"validation {task.metric}",
                budget=dict(epochs=epochs, train_size=len(train_x), batch_size=batch_size,
                            val_size=len(val_x), seed=seed, trials_per_optimizer=TRIALS),
                chosen=chosen, trials=trials)


def main_tune(task_name: str, optimizers: list[str], epochs: int, train_size: int | None,
              batch_size: int, data_dir: str | None, out: Path | None, quiet: bool,
              device: str, command: str) -> Path:
    """``tekfac tune``: tune and write the result file (merging with an existing one)."""
    task = TASKS[task_name]
    result = tune(task, optimizers, epochs, train_size, data_dir, batch_size=batch_size,
                  device=device, quiet=quiet)
    path = out or tuning_path(task_name)
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is not None and old.get("budget") == result["budget"]:  # keep the others' trials
        kept = [t for t in old["trials"] if t["optimizer"] not in optimizers]
        result["chosen"] = {**old["chosen"], **result["chosen"]}
        result["trials"] = kept + result["trials"]
    result["command"] = command
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
