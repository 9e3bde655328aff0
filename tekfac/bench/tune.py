"""Hyper-parameter tuning (benchmark v2): the same quasi-random search for every optimizer.

Each optimizer gets :data:`tekfac.bench.search.TRIALS` trials drawn from its search space
(:mod:`tekfac.bench.search`), each trained at the task's fixed budget (``Task.epochs``, the
batch size, the warm-up + cosine schedule) on the training set minus a validation split, and
evaluated ``evals_per_epoch`` times per epoch on that split (never the test set). The trial
with the fewest steps to the task's validation target wins
(:func:`tekfac.bench.search.select`). Every trial (its values, steps to target, final
validation metric, training wall time, diverged flag) is written to the result file as soon
as it ends; ``resume`` keeps the finished trials of the same budget whose values the search
still draws, and runs the others.

This module owns the result file format: a JSON object whose ``"chosen"`` member maps each
optimizer to its values (read by :func:`load_hparams` and :func:`read_tuning_file`), with
``"trials"``, ``"spaces"``, ``"fixed"`` (the settings :data:`tekfac.bench.search.FIXED` adds to
every trial), ``"budget"``, ``"command"``, ``"machine"``, ``"parts"`` (every invocation that
wrote the file) and ``"wall_time_s"``.
The files of the previous protocol (a grid of 9 points, 1 epoch) have the same ``"chosen"``
member and stay readable.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the atomic replace still applies
    fcntl = None

from tekfac.bench.data import Dataset, load_dataset, split_validation
from tekfac.bench.optimizers import DEFAULT_HPARAMS, SECOND_ORDER
from tekfac.bench.runner import Split, run
from tekfac.bench.search import SPACES, TRIALS, draw, fixed, select, steps_to_target
from tekfac.bench.tasks import TASKS, Task

TUNED_DIR = Path(__file__).parent / "tuned"
#: The units of the Kronecker methods' values a tuning file records (``"curvature_units"``):
#: the curvature of the loss as reduced (issue #32). A file without it was tuned before, in
#: the per-example Fisher's units, and is read through :func:`in_loss_units`.
CURVATURE_UNITS = "loss"
#: Share of the training set held out for validation, and the seed of that split.
VAL_FRACTION, VAL_SEED = 0.1, 0


def tuning_split(data: Dataset, train_size: int | None = None,
                 val_fraction: float = VAL_FRACTION, seed: int = VAL_SEED) -> Split:
    """Training examples and the validation split held out of ``data``'s training set (never
    its test set): the trials train and are scored on it; the final runs
    (:mod:`tekfac.bench.campaign`) train on the same training part and are scored on the test
    set. ``train_size`` keeps only the first examples of the training part."""
    train_x, train_y, val_x, val_y = split_validation(data.train_x, data.train_y, val_fraction,
                                                      seed)
    if train_size is not None:
        train_x, train_y = train_x[:train_size], train_y[:train_size]
    return Split(train_x, train_y, val_x, val_y)


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
        content = json.loads(path.read_text())
        chosen = content["chosen"]
    except (ValueError, KeyError, TypeError):
        chosen = None
    if not isinstance(chosen, dict):
        raise TuningFileError(f"{path} is not a tuning file (no 'chosen' values); write it with "
                              "tekfac tune --out")
    if content.get("curvature_units") != CURVATURE_UNITS:
        chosen = in_loss_units(chosen, TASKS[path.stem].loss_terms if path.stem in TASKS else 1)
    missing = [o for o in optimizers if o not in chosen]
    if missing:
        raise TuningFileError(f"{path} has no values for {', '.join(missing)}; tune them (tekfac "
                              "tune --optimizers ...) or leave them out with --optimizers")
    return chosen


def in_loss_units(chosen: dict[str, dict[str, float]], loss_terms: int
                  ) -> dict[str, dict[str, float]]:
    """Values tuned before issue #32, when the Kronecker methods preconditioned with the
    per-example Fisher ``F̂`` of a loss averaging ``K = loss_terms`` terms per example, in
    today's units (``K·F̂``, docs/design.md §3): their ``lr``, ``damping`` and ``kl_clip``
    times ``K``, which takes the same preconditioned steps (the benchmark's damping is the
    eigenvalue kind, whose λ is absolute). Other optimizers and options are unchanged."""
    scaled = ("lr", "damping", "kl_clip")
    return {name: ({k: v * loss_terms if k in scaled else v for k, v in values.items()}
                   if name in SECOND_ORDER else values) for name, values in chosen.items()}


def load_hparams(task: str, folders: Path | Sequence[Path] = TUNED_DIR
                 ) -> tuple[dict[str, dict[str, float]], str]:
    """The tuned hyper-parameters of ``task`` and their source, from ``folder/<task>.json`` of
    each of ``folders`` in turn: a later folder's values replace an earlier one's for the
    optimizers it has (so a retune of some optimizers can be laid over a whole campaign's
    file), and a folder without the file adds nothing. The source is the file (its name only
    for the shipped folder), or each file with the optimizers it gave; without any file the
    values are the defaults. In the shipped folder an optimizer the file has no values for
    (one added after it was tuned) takes its defaults, and the source names it; a ``--tuned``
    folder's file is taken as it is (the command checks that the files cover the optimizers
    asked for).

    Raises:
        TuningFileError: A file exists but is not a tuning file (see :func:`read_tuning_file`).
    """
    folders = [folders] if isinstance(folders, Path) else list(folders)
    chosen: dict[str, dict[str, float]] = {}
    origin: dict[str, Path] = {}
    for folder in folders:
        path = tuning_path(task, folder)
        if path.is_file():
            values = read_tuning_file(path)
            chosen.update(values)
            origin.update(dict.fromkeys(values, path))
    if not chosen:
        return DEFAULT_HPARAMS, "defaults (no tuning file)"
    if folders != [TUNED_DIR]:
        files = list(dict.fromkeys(origin.values()))
        if len(files) == 1:
            return chosen, str(files[0])
        return chosen, "; ".join(f"{f}: {', '.join(o for o in chosen if origin[o] == f)}"
                                 for f in files)
    untuned = sorted(set(DEFAULT_HPARAMS) - set(chosen))
    source = origin[next(iter(chosen))].name
    if untuned:
        source += f" (defaults for {', '.join(untuned)}: not in the file)"
    return {**DEFAULT_HPARAMS, **chosen}, source


def machine() -> dict:
    """The machine a result was measured on."""
    return dict(platform=platform.platform(), processor=platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads())


def trial_record(task: Task, optimizer: str, index: int, params: dict[str, float],
                 records: list[dict]) -> dict:
    """One trial's JSON record from its run's records (validation metric in ``test_metric``)."""
    final = records[-1]
    return dict(optimizer=optimizer, index=index, params=params,
                steps_to_target=steps_to_target(records, task.validation_target,
                                                task.higher_is_better),
                final_val_metric=final["test_metric"], final_step=final["step"],
                wall_time_s=final["wall_time_s"], diverged=final["diverged"])


def tune(task: Task, optimizers: list[str], *, epochs: int, train_size: int | None,
         data_dir: str | None = None, val_fraction: float = VAL_FRACTION, seed: int = 0,
         batch_size: int = 128, device: str = "cpu", quiet: bool = True, trials: int = TRIALS,
         evals_per_epoch: int = 4, done: Iterable[dict] = (), done_budget: dict | None = None,
         save=None) -> dict:
    """Run every trial of every optimizer (skipping those in ``done``, finished trials of
    budget ``done_budget``) and return the result: chosen values, every trial, spaces and
    budget. ``save(result)`` (if given) is called after each trial with the result so far.

    Raises:
        SystemExit: ``done_budget`` differs from this budget (nothing is trained then).
    """
    split = tuning_split(load_dataset(task.dataset, data_dir), train_size, val_fraction)
    budget = dict(epochs=epochs, batch_size=batch_size, warmup_fraction=task.warmup_fraction,
                  train_size=len(split.train_x), val_size=len(split.eval_x),
                  val_fraction=val_fraction, seed=seed, trials_per_optimizer=trials,
                  evals_per_epoch=evals_per_epoch,
                  val_target=task.validation_target)
    if done_budget is not None and done_budget != budget:
        raise SystemExit(f"tekfac: cannot resume: the earlier budget {done_budget} differs "
                         f"from this one {budget}; rerun with its settings or use another --out")
    points = {o: [{**p, **fixed(task.name, o)} for p in draw(o, trials, seed)]
              for o in optimizers}
    done = list(done)
    records = [t for t in done if _drawn(t, points)]
    if len(records) < len(done):
        print(f"tune {task.name}: {len(done) - len(records)} earlier trials have values that "
              "this search space no longer draws; running them again", flush=True)
    result = dict(task=task.name, metric=f"validation {task.metric}", budget=budget,
                  curvature_units=CURVATURE_UNITS,
                  spaces={o: {k: r._asdict() for k, r in SPACES[o].items()} for o in optimizers},
                  fixed={o: values for o in optimizers if (values := fixed(task.name, o))},
                  selection="fewest steps to the validation target; ties and trials that do "
                  "not reach it by the final validation metric; diverged trials last",
                  sampler=f"optuna.samplers.QMCSampler(qmc_type='sobol', scramble=True, "
                  f"seed={seed}), no pruning", chosen={}, trials=records)
    finished = {(t["optimizer"], t["index"]) for t in records}
    for optimizer in optimizers:
        for index, params in enumerate(points[optimizer]):
            if (optimizer, index) in finished:
                continue
            runs = run(task, split, optimizer, params, seed, epochs, batch_size, device,
                       quiet=quiet, evals_per_epoch=evals_per_epoch,
                       warmup_fraction=task.warmup_fraction)
            trial = trial_record(task, optimizer, index, params, runs)
            records.append(trial)
            print(f"tune {task.name} {optimizer} {index + 1}/{trials} {params}: steps to "
                  f"target {trial['steps_to_target']}, validation {task.metric} "
                  f"{trial['final_val_metric']:.4f}", flush=True)
            if save is not None:
                save(result)
        own = [t for t in records if t["optimizer"] == optimizer]
        result["chosen"][optimizer] = select(own, task.higher_is_better)["params"]
    return result


def _drawn(trial: dict, points: dict[str, list[dict]]) -> bool:
    """Whether a finished trial's values are the point the search draws for its index now
    (a changed range or fixed setting draws other values: the trial must run again)."""
    own = points.get(trial["optimizer"], [])
    return trial["index"] < len(own) and own[trial["index"]] == trial["params"]


def main_tune(task_name: str, optimizers: list[str], epochs: int | None,
              train_size: int | None, batch_size: int, data_dir: str | None, out: Path | None,
              quiet: bool, device: str, command: str, *, trials: int = TRIALS,
              evals_per_epoch: int = 4, resume: bool = False) -> Path:
    """``tekfac tune``: tune and write the result file after every trial.

    Without ``resume`` an existing file is replaced. With ``resume`` its trials of the same
    budget are kept (and not rerun); the other optimizers' trials and chosen values are kept
    too, read again from the file at every write, so that processes tuning different
    optimizers of one task can share one file (:func:`_update_file`). The file's ``"parts"``
    lists every invocation that wrote it (command, machine, start, wall time); ``"command"``
    and ``"machine"`` are the latest, ``"wall_time_s"`` their sum.

    Raises:
        SystemExit: ``resume`` with a file of another budget, or of the previous protocol.
    """
    task = TASKS[task_name]
    path = out or tuning_path(task_name)
    epochs = epochs or task.epochs
    train_size = train_size or task.train_size
    old = json.loads(path.read_text()) if resume and path.is_file() else None
    done: list[dict] = []
    if old is not None:
        if "spaces" not in old:
            raise SystemExit(f"tekfac: cannot resume {path}: it is a tuning file of the "
                             "previous protocol (grid search); use another --out")
        if old.get("curvature_units") != CURVATURE_UNITS:
            raise SystemExit(f"tekfac: cannot resume {path}: its Kronecker trials ran with the "
                             "curvature in the units before issue #32 (docs/design.md §3); "
                             "use another --out")
        done = [t for t in old["trials"] if t["optimizer"] in optimizers]
    start, started = time.perf_counter(), datetime.now(timezone.utc).isoformat()

    def save(result: dict) -> None:
        part = dict(command=command, machine=machine(), started=started,
                    wall_time_s=time.perf_counter() - start)

        def merged(current: dict | None) -> dict:
            current = current or {}
            parts = [p for p in _parts(current) if p.get("started") != started] + [part]
            return dict(result, command=command, machine=part["machine"], parts=parts,
                        wall_time_s=sum(p["wall_time_s"] for p in parts),
                        trials=[t for t in current.get("trials", [])
                                if t["optimizer"] not in optimizers] + result["trials"],
                        chosen={**current.get("chosen", {}), **result["chosen"]},
                        spaces={**current.get("spaces", {}), **result["spaces"]},
                        fixed={**current.get("fixed", {}), **result["fixed"]})

        _update_file(path, merged, read=resume)

    result = tune(task, optimizers, epochs=epochs, train_size=train_size, data_dir=data_dir,
                  batch_size=batch_size, device=device, quiet=quiet, trials=trials,
                  evals_per_epoch=evals_per_epoch, done=done,
                  done_budget=None if old is None else old["budget"], save=save)
    save(result)
    return path


def _update_file(path: Path, merged: Callable[[dict | None], dict], *, read: bool) -> None:
    """Write ``merged(current)`` to ``path`` atomically (a reader never sees half a file), where
    ``current`` is the file's content (``None`` if it does not exist or ``read`` is false).
    The read and the write hold :func:`_folder_lock`, so that two ``tekfac tune --resume``
    processes writing one file never lose each other's trials."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent):
        current = json.loads(path.read_text()) if read and path.is_file() else None
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(merged(current), indent=2) + "\n")
        os.replace(temporary, path)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``folder`` (``flock``); none where the platform has no
    ``fcntl`` (Windows)."""
    if fcntl is None:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _parts(old: dict) -> list[dict]:
    """The invocations that wrote the tuning file ``old``; a file written before ``"parts"``
    existed counts as one, its ``"command"``, ``"machine"`` and ``"wall_time_s"``; no file
    (``{}``) has none."""
    if not old:
        return []
    if "parts" in old:
        return old["parts"]
    return [dict(command=old["command"], machine=old["machine"], wall_time_s=old["wall_time_s"])]
