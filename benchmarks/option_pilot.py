"""Pilot of TEKFAC's step-size and damping options with Benchmark v2's protocol (issue #17).

For each task: the first ``--trials`` points of TEKFAC's quasi-random search space
(:func:`tekfac.bench.search.draw`, the tuning campaign's own points), each trained on the
tuning split (:func:`tekfac.bench.tune.tuning_split`) at the task's budget or ``--epochs``,
once per variant: today's defaults, adaptive damping (``damping_adaptive``), a cheap basis
refresh every 10 steps (``basis_refresh_freq``), rank-128 eigenbases (``basis_rank``). Scored
as the campaign scores trials (:func:`tekfac.bench.tune.trial_record`,
:func:`tekfac.bench.search.select`). Prints one line per trial and the best trial per
variant; ``--out`` also writes every trial as JSON lines.

    python benchmarks/option_pilot.py [--tasks fmnist-cnn fmnist-autoencoder] [--trials 2]
        [--epochs 1] [--variants default "basis rank 128"] [--out pilot.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tekfac.bench.data import load_dataset
from tekfac.bench.runner import run
from tekfac.bench.search import draw, select
from tekfac.bench.tasks import TASKS
from tekfac.bench.tune import trial_record, tuning_split

#: variant name → hyper-parameters added to every trial
VARIANTS: dict[str, dict[str, float]] = {
    "default": {},
    "adaptive damping": {"damping_adaptive": 1.0},
    "basis refresh/10": {"basis_refresh_freq": 10},
    "basis rank 128": {"basis_rank": 128},
    "rank 128, eigen/20": {"basis_rank": 128, "eigen_update_freq": 20},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["fmnist-cnn", "fmnist-autoencoder"],
                        choices=TASKS)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="default: the task's budget")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as `tekfac bench` does
    log = args.out.open("w") if args.out else None
    for name in args.tasks:
        task = TASKS[name]
        epochs = args.epochs or task.epochs
        split = tuning_split(load_dataset(task.dataset), task.train_size)
        points = draw("tekfac", args.trials)
        print(f"\n{name}: {epochs} epochs of {len(split.train_x)} examples, validation target "
              f"{task.validation_target}, {args.trials} Sobol points of TEKFAC's space")
        for variant in args.variants:
            trials = []
            for index, params in enumerate(points):
                records = run(task, split, "tekfac", {**params, **VARIANTS[variant]}, 0, epochs,
                              quiet=True, evals_per_epoch=4,
                              warmup_fraction=task.warmup_fraction)
                trial = trial_record(task, "tekfac", index, params, records)
                trial["variant"] = variant
                trial["step_ms"] = statistics.median(r["step_time_ms"] for r in records[1:])
                trials.append(trial)
                print(f"  {variant:>18} trial {index}: {_short(params)} steps to target "
                      f"{trial['steps_to_target']}, final validation "
                      f"{trial['final_val_metric']:.4f}, step {trial['step_ms']:.0f} ms",
                      flush=True)
                if log is not None:
                    log.write(json.dumps(trial) + "\n")
                    log.flush()
            best = select(trials, task.higher_is_better)
            print(f"  {variant:>18} best: trial {best['index']}, steps to target "
                  f"{best['steps_to_target']}, final validation {best['final_val_metric']:.4f}")


def _short(params: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in params.items())


if __name__ == "__main__":
    main()
