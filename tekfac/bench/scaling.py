"""``tekfac scaling``: steps to target against batch size (issue #29).

The measurement of Shallue et al. (2018, "Measuring the effects of data parallelism on neural
network training") and Zhang et al. (2019, "Which algorithmic choices matter at which batch
sizes?"): for each task, batch size ``B`` and optimizer, the fewest steps that reach the
task's target when the optimizer is retuned at ``B``. Perfect scaling halves the steps when
``B`` doubles; the region where an optimizer keeps close to that line is where more data
parallelism buys wall-clock time.

Protocol, for each task, batch size and optimizer (in that order, so that a partial run has
whole batch sizes):

1. **Trials.** :data:`TRIALS` points of a scrambled Sobol sequence (the same points of the
   unit square at every batch size) over the optimizer's learning rate and, for the Kronecker
   methods, its damping, in windows around the task's tuned values ``lr₀`` and ``λ₀`` at batch
   128 (:func:`space`): the rate from ``lr₀ / 2`` to ``2 · lr₀ · B / 128`` (from half the
   batch-128 optimum to twice the linear scaling rule, so the square-root rule of the
   Adam-like methods lies inside), the damping from ``λ₀ / 10`` to ``10 · λ₀``. A few trials
   cannot search the v2 campaign's ranges of four decades at every batch size; the windows
   spend them where the literature puts the optimum. Every other value (momentum, weight
   decay, κ, intervals) is the tuned value at batch 128 (the tuning files, ``--tuned``): only
   what the batch size is known to move is retuned. Each trial trains for the task's step
   budget (:data:`STEP_BUDGETS`, the same at every batch size, so that the epochs grow with
   ``B``) on the tuning split of the whole training set, with the warm-up and cosine decay over
   the budget, and is evaluated on the validation split at the steps of
   :func:`evaluation_steps` (8 per doubling, a resolution of 9 %).
2. **Stopping.** A trial stops at the first evaluation that meets the validation target, and
   also at the steps of the best trial so far of its batch size: it can no longer have fewer
   steps. Both leave the selection of :func:`tekfac.bench.search.select` (fewest steps to the
   target, ties by the metric at that evaluation, then the final metric) what it would be
   without them, for a fraction of the cost.
3. **Seeds.** The chosen point trains again with seeds ``0 .. seeds-1`` on the same data,
   evaluated on the test set at the same steps and stopped at the test target. The figure and
   the table give the median steps to the target over the seeds: a seed that does not reach it
   counts as infinitely many steps, so the median exists only when more than half reach it.

Outputs in ``--out``: ``config.json`` (settings, values, machine), ``trials.jsonl`` and
``runs.jsonl`` (one record per trial or seed, with its evaluations), and, rewritten at the end
of every invocation from what has finished, ``scaling.json``, ``scaling.md`` and
``<task>.png`` (steps to target against batch size, log–log, one line per optimizer with its
perfect-scaling line). ``resume`` keeps the finished trials and seeds of a folder with the
same settings and runs the rest.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from tekfac.bench.data import load_dataset
from tekfac.bench.runner import Split, run
from tekfac.bench.search import Range, draw, first_reaching, select
from tekfac.bench.tasks import TASKS, Task
from tekfac.bench.tune import TUNED_DIR, load_hparams, tuning_split

#: The step budget of each task, the same at every batch size. The rule, fixed before any
#: scaling run: twice the steps the slower of SGD and AdamW took to the test target at batch
#: 128 in benchmark v2's final runs (docs/results/campaign-v2/final), rounded up to a hundred,
#: so that the smallest batch's baselines reach it with room: ``fmnist-cnn`` SGD 280 steps,
#: ``fmnist-autoencoder`` AdamW 280 (SGD did not reach it in 320 steps).
STEP_BUDGETS = {"fmnist-cnn": 600, "fmnist-autoencoder": 600}
#: The batch sizes, the optimizers and the trials per (task, batch size, optimizer) of the
#: issue's campaign (the defaults of ``tekfac scaling``): SGD with Nesterov momentum, AdamW,
#: Muon, SOAP, KFAC and TEKFAC; 8 trials, a power of two for the Sobol sequence.
BATCH_SIZES = (128, 512, 2048)
OPTIMIZERS = ("sgd", "adamw", "muon", "soap", "kfac", "tekfac")
TRIALS = 8
#: The batch size the tuning files' values belong to, the windows' reference.
BASE_BATCH = 128


def evaluation_steps(budget: int, per_doubling: int = 8) -> list[int]:
    """The steps ``round(2^(k / per_doubling))``, ``k = 0, 1, ...``, up to ``budget``, and
    ``budget`` itself: steps to target measured to a factor ``2^(1/per_doubling)``."""
    steps, k = {budget}, 0
    while (step := round(2 ** (k / per_doubling))) < budget:
        steps.add(step)
        k += 1
    return sorted(steps)


def space(anchor: dict[str, float], batch: int) -> dict[str, Range]:
    """The log-uniform windows searched at batch size ``batch`` around the values ``anchor``
    tuned at :data:`BASE_BATCH`: for ``r = batch / BASE_BATCH``, ``lr`` in
    ``[lr₀ · min(1, r) / 2, 2 · lr₀ · max(1, r)]`` (from half the tuned rate to twice the
    linear scaling rule's, either way) and, if ``anchor`` has one (the Kronecker methods),
    ``damping`` in ``[λ₀ / 10, 10 · λ₀]``."""
    lr, ratio = anchor["lr"], batch / BASE_BATCH
    ranges = {"lr": Range(lr * min(1.0, ratio) / 2, 2 * lr * max(1.0, ratio))}
    if "damping" in anchor:
        ranges["damping"] = Range(anchor["damping"] / 10, 10 * anchor["damping"])
    return ranges


def main_scaling(*, tasks: Sequence[str], batch_sizes: Sequence[int], optimizers: Sequence[str],
                 trials: int, seeds: int, steps: int | None, data_dir: str | None, device: str,
                 out: Path | None, resume: bool, tuned: Sequence[Path], quiet: bool,
                 command: str) -> Path:
    """``tekfac scaling``: run (or resume) the campaign and write its reports; returns ``out``.

    Args:
        tasks: Task names with a step budget (:data:`STEP_BUDGETS`, or ``steps``).
        batch_sizes: The batch sizes, each retuned.
        optimizers: Optimizer names.
        trials: Trials per (task, batch size, optimizer).
        seeds: Seeds of each chosen point (0, 1, ...).
        steps: The step budget of every task instead of :data:`STEP_BUDGETS`, or None.
        data_dir: Folder of the data sets (see :func:`tekfac.bench.data.load_dataset`).
        device: Torch device of the runs.
        out: Output folder (None: ``results/scaling-<timestamp>``).
        resume: Keep the finished trials and seeds in ``out`` and run the others.
        tuned: Folders of the tuning files of the values not retuned (empty: the shipped ones).
        quiet: Plain log lines instead of progress bars.
        command: The command line, recorded in ``config.json``.

    Raises:
        SystemExit: ``resume`` with settings that differ from the folder's, or a task without
            a step budget.
    """
    missing = [t for t in tasks if steps is None and t not in STEP_BUDGETS]
    if missing:
        raise SystemExit(f"tekfac: {', '.join(missing)} has no step budget for the scaling "
                         "campaign; give one with --steps")
    out = out or Path("results") / f"scaling-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    budgets = {t: steps or STEP_BUDGETS[t] for t in tasks}
    anchors = {t: load_hparams(t, tuned or TUNED_DIR) for t in tasks}
    settings = dict(tasks=list(tasks), batch_sizes=list(batch_sizes),
                    optimizers=list(optimizers), trials=trials, seeds=list(range(seeds)),
                    steps=budgets, evaluation_steps={t: evaluation_steps(b)
                                                     for t, b in budgets.items()},
                    values={t: {"values": {o: h[o] for o in optimizers}, "source": s}
                            for t, (h, s) in anchors.items()})
    settings = json.loads(json.dumps(settings))
    done_trials, done_runs = _resumed(out, settings) if resume else ([], [])
    out.mkdir(parents=True, exist_ok=True)
    config = dict(command=command, **settings, device=device,
                  machine=dict(platform=platform.platform(), processor=platform.machine(),
                               torch=torch.__version__, threads=torch.get_num_threads()))
    if resume:
        earlier = json.loads((out / "config.json").read_text())
        config["command"] = earlier["command"]
        config["resumed_by"] = [*earlier.get("resumed_by", []), command]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _rewrite(out / "trials.jsonl", done_trials)
    _rewrite(out / "runs.jsonl", done_runs)
    start = time.perf_counter()
    for name in tasks:
        task = TASKS[name]
        data = load_dataset(task.dataset, data_dir)
        split = tuning_split(data)
        test = Split(split.train_x, split.train_y, data.test_x, data.test_y)
        for batch in batch_sizes:
            for optimizer in optimizers:
                group = _Group(task, batch, optimizer, anchors[name][0][optimizer],
                               budgets[name], device, quiet)
                chosen = group.tune(split, trials, done_trials, out / "trials.jsonl")
                group.seeds(test, chosen, range(seeds), done_runs, out / "runs.jsonl")
    rows = write_reports(done_runs, out)
    print(markdown(rows))
    print(f"total {time.perf_counter() - start:.0f}s; results in {out}")
    return out


class _Group:
    """One (task, batch size, optimizer): its trials, then its seeds."""

    def __init__(self, task: Task, batch: int, optimizer: str, anchor: dict[str, float],
                 budget: int, device: str, quiet: bool):
        self.task, self.batch, self.optimizer, self.anchor = task, batch, optimizer, anchor
        self.budget, self.device, self.quiet = budget, device, quiet
        self.steps = evaluation_steps(budget)
        self.key = dict(task=task.name, batch_size=batch, optimizer=optimizer)

    def tune(self, split: Split, trials: int, done: list[dict], path: Path) -> dict:
        """The chosen trial's values, after running the trials ``done`` lacks (appended to
        ``done`` and to ``path``) in index order."""
        target = self.task.validation_target
        window = space(self.anchor, self.batch)
        points = draw(self.optimizer, trials, space=window)
        own = {t["index"]: t for t in done if _has(t, self.key)}
        for index, point in enumerate(points):
            if index in own:
                continue
            reached = [t["steps_to_target"] for t in own.values()
                       if t["steps_to_target"] is not None]
            cap = min(reached, default=self.budget)
            params = {**self.anchor, **point}
            records = self._train(split, params, 0, target, cap)
            trial = dict(self.key, index=index, params=params,
                         **_outcome(records, target, self.task.higher_is_better),
                         final_val_metric=records[-1]["test_metric"],
                         diverged=records[-1]["diverged"], stopped_at=cap,
                         window={k: r._asdict() for k, r in window.items()},
                         evaluations=[[r["step"], r["test_metric"]] for r in records])
            own[index] = trial
            done.append(trial)
            _append(path, trial)
            print(f"scaling {self.task.name} B={self.batch} {self.optimizer} trial "
                  f"{index + 1}/{trials} {point}: steps to target {trial['steps_to_target']}, "
                  f"validation {self.task.metric} {trial['final_val_metric']:.4f}", flush=True)
        return select([own[i] for i in range(trials)], self.task.higher_is_better)["params"]

    def seeds(self, split: Split, params: dict, seeds: range, done: list[dict],
              path: Path) -> None:
        """Trains ``params`` with each of ``seeds`` that ``done`` lacks on the test split."""
        finished = {r["seed"] for r in done if _has(r, self.key) and r["params"] == params}
        for seed in seeds:
            if seed in finished:
                continue
            records = self._train(split, params, seed, self.task.target, self.budget)
            result = dict(self.key, seed=seed, params=params,
                          **_outcome(records, self.task.target, self.task.higher_is_better),
                          final_test_metric=records[-1]["test_metric"],
                          diverged=records[-1]["diverged"],
                          step_time_ms=statistics.median(r["step_time_ms"] for r in records[1:]),
                          evaluations=[[r["step"], r["test_metric"]] for r in records])
            done.append(result)
            _append(path, result)
            print(f"scaling {self.task.name} B={self.batch} {self.optimizer} seed {seed}: "
                  f"steps to target {result['steps_to_target']}", flush=True)

    def _train(self, split: Split, params: dict, seed: int, target: float,
               cap: int) -> list[dict]:
        """A run of the budget, stopped at the target or at step ``cap``."""
        better = self.task.higher_is_better

        def stop(record: dict) -> bool:
            metric = record["test_metric"]
            met = math.isfinite(metric) and (metric >= target if better else metric <= target)
            return met or record["step"] >= cap

        return run(self.task, split, self.optimizer, params, seed, 1, self.batch, self.device,
                   self.quiet, steps=self.budget, eval_steps=self.steps, stop_when=stop,
                   warmup_fraction=self.task.warmup_fraction)


def _outcome(records: list[dict], target: float, higher_is_better: bool) -> dict:
    """Steps and training seconds to the first evaluation meeting ``target`` (None if none)."""
    first = first_reaching(records, target, higher_is_better)
    return dict(steps_to_target=None if first is None else first["step"],
                time_to_target_s=None if first is None else first["wall_time_s"],
                wall_time_s=records[-1]["wall_time_s"])


def _has(record: dict, key: dict) -> bool:
    return all(record[k] == v for k, v in key.items())


def _resumed(out: Path, settings: dict) -> tuple[list[dict], list[dict]]:
    """The finished trials and seeds in ``out``; refuses a folder of other settings."""
    path = out / "config.json"
    if not path.is_file():
        raise SystemExit(f"tekfac: cannot resume {out}: it holds no config.json of tekfac "
                         "scaling")
    earlier = json.loads(path.read_text())
    changed = [k for k, v in settings.items() if earlier.get(k) != v]
    if changed:
        raise SystemExit(f"tekfac: cannot resume {out}: {', '.join(changed)} differ from its "
                         "config.json; rerun with its settings or use a new --out")
    return _read(out / "trials.jsonl"), _read(out / "runs.jsonl")


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rewrite(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (task, optimizer, batch size) over its seeds, the optimizers in the order
    of ``runs``: ``steps_to_target_median``
    (None unless more than half the seeds reach the target), ``seeds_reaching``, ``seeds``,
    ``time_to_target_s_median`` (same rule), ``step_time_ms_median`` and the ``params``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["task"], r["optimizer"], r["batch_size"])].append(r)
    rows = []
    for (task, optimizer, batch), group in groups.items():
        rows.append(dict(task=task, optimizer=optimizer, batch_size=batch, seeds=len(group),
                         seeds_reaching=sum(r["steps_to_target"] is not None for r in group),
                         steps_to_target_median=_median(r["steps_to_target"] for r in group),
                         time_to_target_s_median=_median(r["time_to_target_s"] for r in group),
                         step_time_ms_median=statistics.median(r["step_time_ms"] for r in group),
                         params=group[0]["params"]))
    order = {o: i for i, o in enumerate(dict.fromkeys(r["optimizer"] for r in runs))}
    return sorted(rows, key=lambda r: (r["task"], order[r["optimizer"]], r["batch_size"]))


def _median(values) -> float | None:
    """The median with None as +∞; None when it is infinite."""
    values = sorted(math.inf if v is None else v for v in values)
    m = statistics.median(values)
    return None if math.isinf(m) else m


def markdown(rows: list[dict]) -> str:
    """Per task, the median steps to target (seeds reaching it / seeds) and the median
    step time, one row per optimizer, one column per batch size."""
    lines = []
    for task in sorted({r["task"] for r in rows}):
        own = [r for r in rows if r["task"] == task]
        batches = sorted({r["batch_size"] for r in own})
        lines += [f"### {task} (target {TASKS[task].target})", "",
                  "| optimizer | " + " | ".join(f"B={b}: steps (reached) · step ms"
                                                 for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for optimizer in dict.fromkeys(r["optimizer"] for r in own):
            cells = []
            for b in batches:
                r = next((r for r in own if r["optimizer"] == optimizer and r["batch_size"] == b),
                         None)
                cells.append("" if r is None else
                             f"{_fmt(r['steps_to_target_median'])} ({r['seeds_reaching']}/"
                             f"{r['seeds']}) · {r['step_time_ms_median']:.0f}")
            lines.append(f"| {optimizer} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(steps: float | None) -> str:
    return "—" if steps is None else f"{steps:g}"


def write_reports(runs: list[dict], out: Path) -> list[dict]:
    """``scaling.json``, ``scaling.md`` and one ``<task>.png`` per task from the seeds'
    records ``runs``; returns the rows."""
    rows = summarize(runs)
    (out / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "scaling.md").write_text(markdown(rows))
    for task in sorted({r["task"] for r in rows}):
        plot([r for r in rows if r["task"] == task], out / f"{task}.png")
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    """Median steps to target against batch size (log–log) of one task's ``rows``, one line
    per optimizer and, dashed in its colour, its perfect-scaling line: its smallest batch's
    steps divided by the batch size's growth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for optimizer in dict.fromkeys(r["optimizer"] for r in rows):
        points = sorted((r["batch_size"], r["steps_to_target_median"]) for r in rows
                        if r["optimizer"] == optimizer and r["steps_to_target_median"])
        if not points:
            continue
        batches, steps = zip(*points)
        line, = ax.plot(batches, steps, marker="o", label=optimizer)
        b0, s0 = points[0]
        ideal = sorted({r["batch_size"] for r in rows if r["batch_size"] >= b0})
        ax.plot(ideal, [s0 * b0 / b for b in ideal], linestyle="--", linewidth=0.8,
                color=line.get_color(), alpha=0.6)
    task = rows[0]["task"]
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="steps to target (median)",
           title=f"{task}: steps to {TASKS[task].metric} {TASKS[task].target} "
                 "(dashed: perfect scaling)")
    ax.set_xticks(sorted({r["batch_size"] for r in rows}),
                  [str(b) for b in sorted({r["batch_size"] for r in rows})])
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no optimizer reached the target", ha="center",
                transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
