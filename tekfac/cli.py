"""Command line: ``tekfac bench`` (the comparison) and ``tekfac tune`` (its hyper-parameters).

Run ``tekfac bench --help`` / ``tekfac tune --help``; ``python -m tekfac`` is the same program.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

PRESETS: dict[str, dict] = {
    "smoke": dict(tasks=["digits-mlp"], seeds=1, epochs=10),
    "quick": dict(tasks=["fmnist-cnn", "fmnist-autoencoder"], seeds=1, epochs=2),
    "full": dict(tasks=["fmnist-cnn", "fmnist-autoencoder", "fmnist-vgg"], seeds=3, epochs=10),
}


def _parser() -> argparse.ArgumentParser:
    from tekfac.bench.optimizers import OPTIMIZERS
    from tekfac.bench.tasks import TASKS

    parser = argparse.ArgumentParser(prog="tekfac", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS),
                        metavar="OPT", help=f"optimizers to run ({', '.join(OPTIMIZERS)})")
    common.add_argument("--data-dir", help="folder with the data sets (default: $TEKFAC_DATA, "
                        "then /usr/share/datasets/fashion-mnist)")
    common.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    common.add_argument("--batch-size", type=int, default=128)
    common.add_argument("--train-size", type=int, default=None,
                        help="use only the first N training examples")
    common.add_argument("--epochs", type=int, default=None)

    bench = sub.add_parser("bench", parents=[common], help="compare the optimizers",
                           description="Train every (task, optimizer, seed) with the tuned "
                           "hyper-parameters and write runs.jsonl, summary.json, summary.md "
                           "and one plot per task.")
    bench.add_argument("--preset", choices=PRESETS, default="quick",
                       help="; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    bench.add_argument("--tasks", nargs="+", choices=TASKS, metavar="TASK",
                       help=f"tasks to run, overriding the preset ({', '.join(TASKS)})")
    bench.add_argument("--seeds", type=int, default=None, help="number of seeds (0, 1, ...)")
    bench.add_argument("--out", type=Path, default=None,
                       help="output folder (default results/<timestamp>)")
    bench.add_argument("--resume", action="store_true",
                       help="continue the run in --out: keep its finished (task, optimizer, "
                       "seed) runs and train the others (the settings must be the same)")
    bench.add_argument("--tuned", type=Path, default=None, metavar="DIR",
                       help="read each task's hyper-parameters from DIR/<task>.json (as "
                       "written by tekfac tune --out) instead of tekfac/bench/tuned/")
    bench.add_argument("--quiet", action="store_true", help="plain log lines, no progress bars")
    bench.add_argument("--nproc", type=int, default=1,
                       help="data-parallel processes on this machine (gloo on CPU, NCCL on "
                       "CUDA); --batch-size stays the global batch. For several machines use "
                       "torchrun (see README)")

    tune = sub.add_parser("tune", parents=[common], help="tune learning rate and damping",
                          description="Grid search with the same number of trials per "
                          "optimizer, scored on a validation split of the training set.")
    tune.add_argument("--task", required=True, choices=TASKS, metavar="TASK",
                      help=f"task to tune ({', '.join(TASKS)})")
    tune.add_argument("--out", type=Path, default=None,
                      help="result file (default tekfac/bench/tuned/<task>.json)")
    tune.add_argument("--progress", action="store_true", help="show progress bars")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir!r} is not a directory")
    for name in ("epochs", "batch_size", "train_size", "seeds"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device name (cpu, cuda, cuda:0, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but no CUDA GPU is available")
    if args.command == "bench":
        if args.tuned is not None:
            _check_tuned(parser, args.tuned, args.tasks or PRESETS[args.preset]["tasks"],
                         args.optimizers)
        out = args.out
        if args.resume and (out is None or not (out / "runs.jsonl").is_file()):
            parser.error(f"--resume needs --out with the runs.jsonl of an earlier run; "
                         f"{out} has none")
        if not args.resume and out is not None and (out / "runs.jsonl").exists():
            parser.error(f"--out {str(out)!r} already holds results; pass --resume to continue "
                         "that run, or choose another folder")


def _check_tuned(parser: argparse.ArgumentParser, folder: Path, tasks: list[str],
                 optimizers: list[str]) -> None:
    """``--tuned DIR`` must hold ``<task>.json`` with values for every optimizer asked for."""
    for task in tasks:
        path = folder / f"{task}.json"
        if not path.is_file():
            parser.error(f"--tuned {str(folder)!r} has no tuning file for {task} (expected "
                         f"{task}.json, from tekfac tune --out)")
        try:
            chosen = json.loads(path.read_text())["chosen"]
        except (ValueError, KeyError, TypeError):
            chosen = None
        if not isinstance(chosen, dict):
            parser.error(f"{path} is not a tuning file (no 'chosen' values); write it with "
                         "tekfac tune --out")
        missing = [o for o in optimizers if o not in chosen]
        if missing:
            parser.error(f"{path} has no values for {', '.join(missing)}; tune them (tekfac "
                         "tune --optimizers ...) or leave them out with --optimizers")


def _bench(args: argparse.Namespace, command: str) -> None:
    from tekfac.bench.data import load_dataset
    from tekfac.bench.report import markdown_table, plot, write_summary
    from tekfac.bench.tasks import TASKS
    from tekfac.bench.tune import TUNED_DIR, load_hparams

    rank = dist.get_rank() if dist.is_initialized() else 0
    preset = PRESETS[args.preset]
    tasks = args.tasks or preset["tasks"]
    seeds = range(args.seeds or preset["seeds"])
    epochs = args.epochs or preset["epochs"]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("results") / stamp
    datasets = {TASKS[t].dataset: load_dataset(TASKS[t].dataset, args.data_dir) for t in tasks}
    hparams = {t: load_hparams(t, args.tuned or TUNED_DIR) for t in tasks}
    world = dist.get_world_size() if dist.is_initialized() else 1
    settings = dict(tasks=tasks, optimizers=args.optimizers, seeds=list(seeds), epochs=epochs,
                    batch_size=args.batch_size, train_size=args.train_size,
                    hparams={t: {"values": h, "source": s} for t, (h, s) in hparams.items()})
    config = dict(command=command, **settings, device=args.device, processes=world,
                  machine=dict(platform=platform.platform(), processor=platform.machine(),
                               cpus=os.cpu_count(), torch=torch.__version__,
                               threads=torch.get_num_threads(),
                               flush_denormal=torch.device(args.device).type == "cpu"))
    records = _resumed(out, settings, config) if args.resume and rank == 0 else []
    done = {(r["task"], r["optimizer"], r["seed"]) for r in records}
    if dist.is_initialized():  # every rank skips the same runs
        shared = [sorted(done)]
        dist.broadcast_object_list(shared, src=0)
        done = {tuple(key) for key in shared[0]}
    if rank > 0:  # the other ranks train; rank 0 records and reports
        for task_name in tasks:
            _run_task(args, TASKS[task_name], datasets, hparams, seeds, epochs, None, done)
        return
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
        for task_name in tasks:
            _run_task(args, TASKS[task_name], datasets, hparams, seeds, epochs, emit, done)
    write_summary(records, out)
    plot(records, out)
    print(markdown_table(json.loads((out / "summary.json").read_text())))
    print(f"total {time.perf_counter() - start:.0f}s; results in {out}")


def _resumed(out: Path, settings: dict, config: dict) -> list[dict]:
    """The records of the finished runs in ``out`` (those with every epoch); refuses settings
    that differ from the earlier invocation's. Adds the earlier commands to ``config``."""
    earlier = json.loads((out / "config.json").read_text())
    changed = [k for k, v in settings.items() if earlier.get(k) != json.loads(json.dumps(v))]
    if changed:
        raise SystemExit(f"tekfac: cannot resume {out}: {', '.join(changed)} differ from the "
                         "earlier run's config.json; rerun with its settings or use a new --out")
    config["resumed_by"] = [*earlier.get("resumed_by", []), config["command"]]
    config["command"] = earlier["command"]
    from tekfac.bench.report import finished_records

    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()
               if line.strip()]
    return finished_records(records, settings["epochs"])


def _run_task(args, task, datasets, hparams, seeds, epochs, emit, done=frozenset()) -> None:
    from tekfac.bench.runner import Split, run

    data = datasets[task.dataset]
    n = args.train_size or len(data.train_x)
    split = Split(data.train_x[:n], data.train_y[:n], data.test_x, data.test_y)
    for optimizer in args.optimizers:
        for seed in seeds:
            if (task.name, optimizer, seed) in done:
                continue
            run(task, split, optimizer, hparams[task.name][0][optimizer], seed, epochs,
                args.batch_size, args.device, args.quiet, emit)


def _init_distributed(device: str) -> None:
    """Join the process group that ``torchrun`` (or ``--nproc``) describes in the
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method="env://")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def _spawned(rank: int, nproc: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    code = main(argv)
    if code:
        raise SystemExit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tekfac`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    command = "tekfac " + shlex.join(argv)
    from tekfac.bench.data import DataError

    if args.command == "bench" and args.nproc > 1:
        if args.batch_size % args.nproc:
            parser.error(f"--batch-size {args.batch_size} is not divisible by --nproc "
                         f"{args.nproc}")
        child = [*argv, "--nproc", "1"]  # each process is one rank (the last value wins)
        torch.multiprocessing.spawn(_spawned, args=(args.nproc, _free_port(), child),
                                    nprocs=args.nproc)
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        _init_distributed(args.device)
    # Subnormal floats are ~100x slower on CPUs; they appear late in some runs (Adam on
    # fmnist-cnn after ~5 epochs) and would distort the wall-clock comparison. Flushed to zero
    # for every optimizer alike while the command runs.
    flush = torch.device(args.device).type == "cpu" and torch.set_flush_denormal(True)
    try:
        if args.command == "bench":
            _bench(args, command)
            if dist.is_initialized():
                dist.barrier()  # rank 0 writes the reports; leave together
        else:
            from tekfac.bench.tune import main_tune

            path = main_tune(args.task, args.optimizers, args.epochs or 1,
                             args.train_size or 20_000, args.batch_size, args.data_dir, args.out,
                             not args.progress, args.device, command)
            print(f"wrote {path}")
    except DataError as e:
        print(f"tekfac: {e}", file=sys.stderr)
        return 2
    finally:
        if flush:
            torch.set_flush_denormal(False)
        if dist.is_initialized():  # free the models and optimizers (hook cycles) first:
            gc.collect()  # gloo work freed during interpreter shutdown can abort the process
            dist.destroy_process_group()
    return 0
