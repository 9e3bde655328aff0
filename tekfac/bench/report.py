"""Summaries, tables and plots of benchmark records (see :mod:`tekfac.bench.runner`)."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from tekfac.bench.search import first_reaching, steps_to_target
from tekfac.bench.tasks import TASKS

SUMMARY_KEYS = (
    "task", "optimizer", "seeds", "epochs", "metric_name", "final_train_loss_mean",
    "final_train_loss_std", "final_test_metric_mean", "final_test_metric_std", "target",
    "time_to_target_s_mean", "time_to_target_s_median", "seeds_reaching_target",
    "step_time_ms_median", "wall_time_s_mean", "diverged_runs", "steps_to_target_median",
    "step_cost_vs_sgd", "peak_memory_mb", "kl_clip_factor_median", "kl_clipped_fraction",
)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def finished_records(records: list[dict]) -> list[dict]:
    """The records of the (task, optimizer, seed) runs that have their final record (marked
    ``last`` by the runner; an interrupted run lacks it)."""
    done = {(r["task"], r["optimizer"], r["seed"]) for r in records if r.get("last")}
    return [r for r in records if (r["task"], r["optimizer"], r["seed"]) in done]


def time_to_target(records: list[dict], target: float, higher_is_better: bool) -> float | None:
    """Training seconds at the first evaluation whose test metric meets ``target``."""
    r = first_reaching(records, target, higher_is_better)
    return None if r is None else r["wall_time_s"]


def summarize(records: list[dict]) -> list[dict]:
    """One summary row per (task, optimizer), over seeds, in the keys of :data:`SUMMARY_KEYS`.

    Means and (population) standard deviations are over the seeds' final epochs; diverged runs
    are counted and left out of the means (wall time included). ``time_to_target`` is over
    the seeds that reached the target; ``step_time_ms_median`` is the median of the epochs'
    median step times.
    """
    runs: dict[tuple[str, str], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        runs[(r["task"], r["optimizer"])][r["seed"]].append(r)
    rows = []
    for (task_name, optimizer), by_seed in runs.items():
        task = TASKS[task_name]
        finals = [max(rs, key=lambda r: r["epoch"]) for rs in by_seed.values()]
        loss_mean, loss_std = _mean_std([r["train_loss"] for r in finals if not r["diverged"]])
        metric_mean, metric_std = _mean_std([r["test_metric"] for r in finals
                                             if not r["diverged"]])
        ttt = [t for rs in by_seed.values()
               if (t := time_to_target(rs, task.target, task.higher_is_better)) is not None]
        steps = [r["step_time_ms"] for rs in by_seed.values() for r in rs
                 if r["step_time_ms"] is not None]
        stt = [s for rs in by_seed.values()
               if (s := steps_to_target(rs, task.target, task.higher_is_better)) is not None]
        memory = [r["peak_memory_mb"] for rs in by_seed.values() for r in rs
                  if r.get("peak_memory_mb") is not None]
        nus = [v for rs in by_seed.values() for r in rs for v in r.get("kl_clip_factors", [])
               if math.isfinite(v)]
        rows.append(dict(
            task=task_name, optimizer=optimizer, seeds=sorted(by_seed),
            epochs=max(r["epoch"] for r in finals), metric_name=task.metric,
            final_train_loss_mean=loss_mean, final_train_loss_std=loss_std,
            final_test_metric_mean=metric_mean, final_test_metric_std=metric_std,
            target=task.target,
            time_to_target_s_mean=statistics.fmean(ttt) if ttt else None,
            time_to_target_s_median=statistics.median(ttt) if ttt else None,
            seeds_reaching_target=len(ttt),
            step_time_ms_median=statistics.median(steps) if steps else None,
            wall_time_s_mean=_mean_std([r["wall_time_s"] for r in finals
                                        if not r["diverged"]])[0],
            diverged_runs=sum(r["diverged"] for r in finals),
            steps_to_target_median=statistics.median(stt) if stt else None,
            peak_memory_mb=max(memory) if memory else None,
            kl_clip_factor_median=statistics.median(nus) if nus else None,
            kl_clipped_fraction=sum(v < 1 for v in nus) / len(nus) if nus else None,
        ))
    sgd = {r["task"]: r["step_time_ms_median"] for r in rows if r["optimizer"] == "sgd"}
    for r in rows:
        base = sgd.get(r["task"])
        r["step_cost_vs_sgd"] = (r["step_time_ms_median"] / base
                                 if base and r["step_time_ms_median"] is not None else None)
    return rows


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def markdown_table(rows: list[dict]) -> str:
    """The summary as a Markdown table, one line per (task, optimizer)."""
    head = ("| task | optimizer | seeds | epochs | final train loss | final test metric | "
            "target | seeds at target | time to target (s, median) | steps to target | "
            "step (ms, median) | ×SGD | peak MiB | ν median | wall (s, mean) | diverged |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['optimizer']} | {len(r['seeds'])} | {r['epochs']} | "
            f"{_fmt(r['final_train_loss_mean'])} ± {_fmt(r['final_train_loss_std'], 2)} | "
            f"{r['metric_name']} {_fmt(r['final_test_metric_mean'])} ± "
            f"{_fmt(r['final_test_metric_std'], 2)} | {r['target']} | "
            f"{r['seeds_reaching_target']}/{len(r['seeds'])} | "
            f"{_fmt(r['time_to_target_s_median'])} | {_fmt(r['steps_to_target_median'])} | "
            f"{_fmt(r['step_time_ms_median'], 3)} | {_fmt(r.get('step_cost_vs_sgd'), 3)} | "
            f"{_fmt(r.get('peak_memory_mb'), 3)} | {_fmt(r.get('kl_clip_factor_median'), 3)} | "
            f"{_fmt(r['wall_time_s_mean'])} | {r['diverged_runs']} |")
    return "\n".join(lines) + "\n"


def write_summary(records: list[dict], out: Path) -> list[dict]:
    """Write ``summary.json`` and ``summary.md`` into ``out``; return the rows."""
    rows = summarize(records)
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "summary.md").write_text(markdown_table(rows))
    return rows


def plot(records: list[dict], out: Path) -> list[Path]:
    """One PNG per task: training loss and test metric against epochs and against training
    seconds, the mean over seeds for each optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task: dict[str, dict[str, dict[int, list[dict]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        by_task[r["task"]][r["optimizer"]][r["epoch"]].append(r)
    paths = []
    for task_name, by_opt in by_task.items():
        task = TASKS[task_name]
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for optimizer, by_epoch in by_opt.items():
            epochs = sorted(by_epoch)
            curves = {key: [_mean_std([r[key] for r in by_epoch[e]])[0] for e in epochs]
                      for key in ("train_loss", "test_metric", "wall_time_s")}
            for row, key in enumerate(("train_loss", "test_metric")):
                pts = [(e, t, v) for e, t, v in zip(epochs, curves["wall_time_s"], curves[key])
                       if v is not None]
                if not pts:
                    continue
                es, ts, vs = zip(*pts)
                axes[row][0].plot(es, vs, marker="o", label=optimizer)
                axes[row][1].plot(ts, vs, marker="o", label=optimizer)
        for col, xlabel in enumerate(("epoch", "training time (s)")):
            axes[0][col].set(xlabel=xlabel, ylabel="training loss", yscale="log")
            axes[1][col].set(xlabel=xlabel, ylabel=task.metric)
            axes[1][col].axhline(task.target, color="grey", linestyle=":", linewidth=1)
        axes[0][0].legend()
        fig.suptitle(task_name)
        fig.tight_layout()
        path = out / f"{task_name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def performance_profile(rows: list[dict], path: Path, tau_max: float = 10.0) -> Path:
    """Write the performance profile of the summary ``rows`` as a PNG (AlgoPerf-style).

    For optimizer ``o`` and task ``t`` let ``r_{o,t} = T_{o,t} / min_o' T_{o',t}``, where
    ``T`` is the median training time to the test target (``time_to_target_s_median``;
    infinite when no seed reached it). The curve of ``o`` is
    ``ρ_o(τ) = |{t : r_{o,t} ≤ τ}| / |tasks|`` for ``τ`` in ``[1, tau_max]`` (log axis): the
    fraction of tasks it solves within ``τ`` times the fastest optimizer's time.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        t = r["time_to_target_s_median"]
        times[r["optimizer"]][r["task"]] = math.inf if t is None else t
    tasks = sorted({r["task"] for r in rows})
    best = {t: min(times[o].get(t, math.inf) for o in times) for t in tasks}
    taus = [tau_max ** (i / 200) for i in range(201)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for optimizer, by_task in times.items():
        ratios = [by_task.get(t, math.inf) / best[t] if math.isfinite(best[t]) else math.inf
                  for t in tasks]
        ax.step(taus, [sum(r <= tau for r in ratios) / len(tasks) for tau in taus],
                where="post", label=optimizer)
    ax.set(xscale="log", xlabel="τ (time to target / fastest optimizer's)",
           ylabel="fraction of tasks", ylim=(-0.02, 1.02),
           title=f"Performance profile ({len(tasks)} tasks)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
