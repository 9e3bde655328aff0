"""Command line: ``tekfac bench`` (the comparison), ``tekfac tune`` (its hyper-parameters) and
``tekfac scaling`` (steps to target against batch size).

Run ``tekfac <command> --help``; ``python -m tekfac`` is the same program.
This module only builds the parser, checks the arguments (bad input is a usage error, exit code
2) and dispatches: the bench campaign is :mod:`tekfac.bench.campaign`, tuning
:mod:`tekfac.bench.tune`, the scaling campaign :mod:`tekfac.bench.scaling`, and the processes
they run in (``--nproc``, ``torchrun``) :mod:`tekfac.bench.processes`.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

import torch

from tekfac.bench import campaign, processes, scaling, tune
from tekfac.bench.campaign import PRESETS
from tekfac.bench.data import DataError
from tekfac.bench.optimizers import EXTRA_MODULES, OPTIMIZERS
from tekfac.bench.tasks import TASKS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tekfac", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=None,
                        metavar="OPT", help=f"optimizers to run ({', '.join(OPTIMIZERS)}; "
                        "default: the preset's for bench, all for tune, six for scaling; soap and "
                        "shampoo need "
                        "the bench extra)")
    common.add_argument("--data-dir", help="folder with the data sets (default: $TEKFAC_DATA, "
                        "then /usr/share/datasets/fashion-mnist and, for text-gpt, "
                        "/usr/share/games/fortunes)")
    common.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    runs = argparse.ArgumentParser(add_help=False, parents=[common])
    runs.add_argument("--batch-size", type=int, default=128)
    runs.add_argument("--train-size", type=int, default=None,
                        help="override the task's training examples (Task.train_size): use "
                        "only the first N (for text-gpt, windows of 64 characters)")
    runs.add_argument("--epochs", type=int, default=None,
                        help="override the task's fixed budget (Task.epochs)")
    runs.add_argument("--evals-per-epoch", type=int, default=4,
                        help="evaluations per epoch (steps-to-target resolution; untimed)")

    bench_cmd = sub.add_parser("bench", parents=[runs], help="compare the optimizers",
                               description="Train every (task, optimizer, seed) with the tuned "
                               "hyper-parameters and write runs.jsonl, summary.json, summary.md "
                               "and one plot per task.")
    bench_cmd.add_argument("--preset", choices=PRESETS, default="quick",
                           help="; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    bench_cmd.add_argument("--tasks", nargs="+", choices=TASKS, metavar="TASK",
                           help=f"tasks to run, overriding the preset ({', '.join(TASKS)})")
    bench_cmd.add_argument("--seeds", type=int, default=None, help="number of seeds (0, 1, ...)")
    bench_cmd.add_argument("--out", type=Path, default=None,
                           help="output folder (default results/<timestamp>)")
    bench_cmd.add_argument("--resume", action="store_true",
                           help="continue the run in --out: keep its finished (task, optimizer, "
                           "seed) runs and train the others (the settings must be the same)")
    bench_cmd.add_argument("--tuned", type=Path, nargs="+", default=None, metavar="DIR",
                           help="read each task's hyper-parameters from DIR/<task>.json (as "
                           "written by tekfac tune --out) instead of tekfac/bench/tuned/; with "
                           "several folders a later one's values replace an earlier one's for "
                           "the optimizers it has")
    bench_cmd.add_argument("--reuse", type=Path, default=None, metavar="DIR",
                           help="take the finished runs of the campaign in DIR whose task "
                           "settings and hyper-parameters are this campaign's, instead of "
                           "training them again (their wall times are DIR's machine and day)")
    bench_cmd.add_argument("--quiet", action="store_true", help="plain log lines, no progress bars")
    bench_cmd.add_argument("--step-rule", choices=["fixed", "quadratic"], default="fixed",
                           help="quadratic: the Kronecker methods take the quadratic-model step "
                                "(rate and momentum chosen each step, adaptive damping from "
                                "0.1, statistics every step, bases every 5), untuned, whatever "
                                "the tuning files say")
    bench_cmd.add_argument("--nproc", type=int, default=1,
                           help="data-parallel processes on this machine (gloo on CPU, NCCL on "
                           "CUDA); --batch-size stays the global batch. For several machines use "
                           "torchrun (see README)")

    tune_cmd = sub.add_parser("tune", parents=[runs], help="tune the hyper-parameters",
                              description="Quasi-random (scrambled Sobol) search with the same "
                              "number of trials per optimizer at the task's budget, scored by "
                              "steps to the validation target on a split of the training set.")
    tune_cmd.add_argument("--task", required=True, choices=TASKS, metavar="TASK",
                          help=f"task to tune ({', '.join(TASKS)})")
    tune_cmd.add_argument("--out", type=Path, default=None,
                          help="result file (default tekfac/bench/tuned/<task>.json)")
    tune_cmd.add_argument("--trials", type=int, default=tune.TRIALS,
                          help="trials per optimizer (default %(default)s, a power of two)")
    tune_cmd.add_argument("--resume", action="store_true",
                          help="keep the finished trials in --out (same budget) and run the rest")
    tune_cmd.add_argument("--progress", action="store_true", help="show progress bars")

    scaling_cmd = sub.add_parser(
        "scaling", parents=[common], help="steps to target against batch size",
        description="Retune the rate (and the Kronecker methods' damping) at every batch size, "
        "train each chosen point with several seeds, and write the median steps to the target "
        "against batch size (scaling.json, scaling.md, one log-log plot per task).")
    scaling_cmd.add_argument("--tasks", nargs="+", choices=TASKS, metavar="TASK",
                             default=list(scaling.STEP_BUDGETS),
                             help="tasks (default %(default)s; others need --steps)")
    scaling_cmd.add_argument("--batch-sizes", type=int, nargs="+",
                             default=list(scaling.BATCH_SIZES), metavar="B",
                             help="batch sizes (default %(default)s)")
    scaling_cmd.add_argument("--trials", type=int, default=scaling.TRIALS,
                             help="trials per task, batch size and optimizer (default "
                             "%(default)s)")
    scaling_cmd.add_argument("--seeds", type=int, default=3,
                             help="seeds of each chosen point (default %(default)s)")
    scaling_cmd.add_argument("--steps", type=int, default=None,
                             help="step budget of every task, overriding the campaign's "
                             "(tekfac.bench.scaling.STEP_BUDGETS)")
    scaling_cmd.add_argument("--out", type=Path, default=None,
                             help="output folder (default results/scaling-<timestamp>)")
    scaling_cmd.add_argument("--resume", action="store_true",
                             help="keep the finished trials and seeds in --out (same settings) "
                             "and run the rest")
    scaling_cmd.add_argument("--tuned", type=Path, nargs="+", default=None, metavar="DIR",
                             help="tuning files of the values not retuned, as for bench "
                             "--tuned (default tekfac/bench/tuned/)")
    scaling_cmd.add_argument("--progress", action="store_true", help="show progress bars")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reports bad arguments with ``parser.error`` (usage message, exit code 2)."""
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir!r} is not a directory")
    for name in ("epochs", "batch_size", "train_size", "seeds", "evals_per_epoch", "trials",
                 "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if min(getattr(args, "batch_sizes", None) or [1]) < 1:
        parser.error(f"--batch-sizes must be at least 1, got {args.batch_sizes}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:0, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but no CUDA GPU is available")
    if args.command == "bench":
        optimizers = args.optimizers or PRESETS[args.preset]["optimizers"]
    elif args.command == "scaling":
        optimizers = args.optimizers or list(scaling.OPTIMIZERS)
    else:
        optimizers = args.optimizers or list(OPTIMIZERS)
    for name in optimizers:
        module = EXTRA_MODULES.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            parser.error(f"optimizer {name} needs the package {module}: install the bench "
                         "extra (pip install -e '.[bench]') or leave it out with --optimizers")
    if args.command in ("tune", "scaling") and importlib.util.find_spec("optuna") is None:
        parser.error(f"tekfac {args.command} needs optuna: install the bench extra (pip "
                     "install -e '.[bench]')")
    if args.command == "scaling":
        if args.tuned is not None:
            _check_tuned(parser, args.tuned, args.tasks, optimizers)
        if args.resume and (args.out is None or not (args.out / "config.json").is_file()):
            parser.error(f"--resume needs --out with the config.json of an earlier tekfac "
                         f"scaling; {args.out} has none")
        if not args.resume and args.out is not None and (args.out / "config.json").exists():
            parser.error(f"--out {str(args.out)!r} already holds results; pass --resume to "
                         "continue that run, or choose another folder")
    if args.command == "bench":
        if args.tuned is not None:
            _check_tuned(parser, args.tuned, args.tasks or PRESETS[args.preset]["tasks"],
                         optimizers)
        if args.reuse is not None and not (args.reuse / "config.json").is_file():
            parser.error(f"--reuse {str(args.reuse)!r} holds no campaign (no config.json from "
                         "tekfac bench --out)")
        out = args.out
        if args.resume and (out is None or not (out / "runs.jsonl").is_file()):
            parser.error(f"--resume needs --out with the runs.jsonl of an earlier run; "
                         f"{out} has none")
        if not args.resume and out is not None and (out / "runs.jsonl").exists():
            parser.error(f"--out {str(out)!r} already holds results; pass --resume to continue "
                         "that run, or choose another folder")
        if args.nproc > 1 and args.batch_size % args.nproc:
            parser.error(f"--batch-size {args.batch_size} is not divisible by --nproc "
                         f"{args.nproc}")


def _check_tuned(parser: argparse.ArgumentParser, folders: list[Path], tasks: list[str],
                 optimizers: list[str]) -> None:
    """Every ``--tuned DIR`` must hold ``<task>.json``; with one folder its file must have
    values for every optimizer asked for, with several their files together."""
    for task in tasks:
        try:
            if len(folders) == 1:
                tune.read_tuning_file(tune.tuning_path(task, folders[0]), optimizers)
                continue
            covered = set().union(*(tune.read_tuning_file(tune.tuning_path(task, folder))
                                    for folder in folders))
        except tune.TuningFileError as e:
            parser.error(str(e))
        missing = [o for o in optimizers if o not in covered]
        if missing:
            parser.error(f"the --tuned folders have no values for {', '.join(missing)} on "
                         f"{task}; tune them (tekfac tune --optimizers ...) or leave them out "
                         "with --optimizers")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tekfac`` console script.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0, or 2 if a data set is missing or corrupt (the message goes to
        stderr). Bad arguments exit with code 2 through ``parser.error``.
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    command = "tekfac " + shlex.join(argv)
    if args.command == "bench" and args.nproc > 1:
        child = [*argv, "--nproc", "1"]  # each process is one rank (the last value wins)
        processes.spawn(main, child, args.nproc)
        return 0
    with processes.session(args.device):
        try:
            if args.command == "bench":
                campaign.main_bench(
                    preset=args.preset, tasks=args.tasks, optimizers=args.optimizers,
                    seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size,
                    train_size=args.train_size, data_dir=args.data_dir, device=args.device,
                    out=args.out, resume=args.resume, tuned=args.tuned or (),
                    reuse=args.reuse, quiet=args.quiet,
                    command=command, evals_per_epoch=args.evals_per_epoch,
                    step_rule=args.step_rule)
            elif args.command == "scaling":
                scaling.main_scaling(
                    tasks=args.tasks, batch_sizes=args.batch_sizes,
                    optimizers=args.optimizers or list(scaling.OPTIMIZERS), trials=args.trials,
                    seeds=args.seeds, steps=args.steps, data_dir=args.data_dir,
                    device=args.device, out=args.out, resume=args.resume,
                    tuned=args.tuned or (), quiet=not args.progress, command=command)
            else:
                path = tune.main_tune(args.task, args.optimizers or list(OPTIMIZERS),
                                      args.epochs, args.train_size, args.batch_size,
                                      args.data_dir, args.out, not args.progress, args.device,
                                      command, trials=args.trials,
                                      evals_per_epoch=args.evals_per_epoch, resume=args.resume)
                print(f"wrote {path}")
        except DataError as e:
            print(f"tekfac: {e}", file=sys.stderr)
            return 2
    return 0
