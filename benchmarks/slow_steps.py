"""Single slow MC steps on a small nanoGPT-like model (issue #15, item 3): where their time goes.

    python benchmarks/slow_steps.py [--steps 200] [--method tekfac] [--flush-denormal]
        [--eigen-update-freq 50] [--device cpu] [--threads N] [--busy K] [--compile]

Trains a small character-level GPT (our own definition with nanoGPT's structure: token
embedding tied to the ``lm_head``, learned positions, pre-LayerNorm blocks of causal
self-attention with its own ``nn.Linear`` ``c_attn``/``c_proj`` and a GELU MLP, logits flattened
at the loss, ``opt.backward(loss, logits.view(-1, V))``) with the MC Fisher and the library's
default options except ``--eigen-update-freq``, on the fortunes corpus when it is installed
(``/usr/share/games/fortunes``), else on random tokens. About 40 s on 2 idle CPU cores.

Measured, for every step: the wall and CPU time (``time.process_time``, all threads) of
forward, ``opt.backward`` and ``opt.step()`` (synchronised on CUDA); the time spent in each of
the library's named stages (:mod:`tekfac.profiling`, timed by wrapping ``stage``); and every
``torch.linalg.eigh`` attempt of ``tekfac.linalg.symmetric_eigh`` (``_try_eigh``): its size,
dtype, whether it is the float64 retry, its time, and how many float32 subnormals
(``0 < |x| < 2^-126``) its input holds. Printed: a table per step kind (``plain``;
``statistics``: factors or scaling but no eigendecomposition; ``eigen``: a step that
eigendecomposes), the slowest steps with their stage times, the eigendecomposition attempts
(first tries, retries, time), the range of the factors' eigenvalues at the last eigen step,
and the subnormal entries left in the state.

Hypotheses this separates: subnormal floats (compare ``--flush-denormal``), float64 retries of
the eigendecomposition (counted), ill-conditioned or huge factors (eigenvalue ranges), a CPU
shared with other jobs (``--busy K`` spins K competing processes; a CPU time far above the
wall time of one thread's work is threads spinning while they wait for each other), and
``torch.compile`` (``--compile``: the first step compiles).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tekfac
import tekfac.linalg
import tekfac.optim
import tekfac.preconditioner
import tekfac.profiling

FORTUNES = Path("/usr/share/games/fortunes")
TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32, 2^-126


# ------------------------------------------------------------------------- model and data
class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, width = x.shape
        q, k, v = (z.view(n, t, self.heads, width // self.heads).transpose(1, 2)
                   for z in self.c_attn(x).split(width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(n, t, width))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.c_fc, self.c_proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """``(N, T)`` tokens to ``(N, T, V)`` logits; ``lm_head`` shares the token embedding."""

    def __init__(self, vocab: int, context: int, layers: int, width: int, heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.wte(tokens) + self.wpe(positions)  # per example, so that wpe is tracked
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def corpus(vocab: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, str]:
    """``size`` tokens of text: the fortunes corpus as bytes (the ``vocab - 1`` most frequent
    ones, others mapped to token 0), or random tokens when it is not installed."""
    files = sorted(p for p in FORTUNES.glob("*") if p.is_file() and not p.suffix) if (
        FORTUNES.is_dir()) else []
    text = b"".join(p.read_bytes() for p in files)[:size]
    if len(text) < size:
        return torch.randint(0, vocab, (size,), generator=gen), "random tokens"
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    ranked = torch.bincount(data, minlength=256).argsort(descending=True)
    table = torch.zeros(256, dtype=torch.long)
    table[ranked[:vocab - 1]] = torch.arange(1, vocab)
    return table[data], f"fortunes ({len(files)} files)"


# ------------------------------------------------------------------------- instrumentation
def clock() -> tuple[float, float]:
    """(wall, CPU time of the whole process, all threads) in seconds."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) milliseconds since ``start``."""
    now = clock()
    return 1e3 * (now[0] - start[0]), 1e3 * (now[1] - start[1])


class Timers:
    """Wall and CPU time per library stage within the current step, and of every eigh
    attempt of the run (``_try_eigh``; the second attempt of one ``symmetric_eigh`` call is
    the float64 retry)."""

    def __init__(self, sync):
        self.sync = sync
        self.stages: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.attempts: list[dict] = []
        self.step = 0
        self._tries = 0  # attempts within the current symmetric_eigh call

    def install(self) -> None:
        original_stage, original_try = tekfac.profiling.stage, tekfac.linalg._try_eigh
        original_eigh = tekfac.preconditioner.symmetric_eigh

        @contextlib.contextmanager
        def timed_stage(name: str):
            self.sync()
            start = clock()
            with original_stage(name):
                yield
            self.sync()
            wall, cpu = since(start)
            self.stages[name][0] += wall
            self.stages[name][1] += cpu

        def counted_eigh(*args, **kwargs):
            self._tries = 0
            return original_eigh(*args, **kwargs)

        def timed_try(matrix: torch.Tensor):
            self._tries += 1
            subnormal = int(((matrix.abs() < TINY) & (matrix != 0)).sum())
            self.sync()
            start = clock()
            result = original_try(matrix)
            self.sync()
            wall, cpu = since(start)
            self.attempts.append(dict(step=self.step, size=len(matrix), retry=self._tries > 1,
                                      dtype=str(matrix.dtype).removeprefix("torch."),
                                      failed=result is None, ms=wall, cpu_ms=cpu,
                                      subnormal=subnormal))
            return result

        tekfac.preconditioner.stage = tekfac.optim.stage = timed_stage
        tekfac.preconditioner.symmetric_eigh = counted_eigh
        tekfac.linalg._try_eigh = timed_try


def busy(seconds: float) -> None:
    """Spin for ``seconds`` (a competing process, like another job on a shared machine)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def subnormals(tensors) -> tuple[int, int]:
    """(float32-subnormal entries, all entries) of ``tensors``."""
    count = total = 0
    for t in tensors:
        count += int(((t.abs() < TINY) & (t != 0)).sum())
        total += t.numel()
    return count, total


# ------------------------------------------------------------------------- the run
def train(args, timers: Timers, sync) -> tuple[tekfac.KroneckerOptimizer, list[dict]]:
    """Train ``args.steps`` steps; per step its kind, wall and CPU ms, loss, stage times."""
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    tokens, source = corpus(args.vocab, 200_000, gen)
    model = TinyGPT(args.vocab, args.context, args.layers, args.width, heads=4).to(device)
    opt = tekfac.KroneckerOptimizer(model, args.method, seed=args.seed,
                                    eigen_update_freq=args.eigen_update_freq)
    pre = opt.preconditioner
    forward = torch.compile(model) if args.compile else model
    print(f"{args.method.upper()}, fisher=mc, {args.steps} steps, batch {args.batch}×"
          f"{args.context}, {args.layers} layers × width {args.width}, vocab {args.vocab}, "
          f"{source}, {torch.get_num_threads()} torch threads, {args.busy} busy processes, "
          f"device {device}, flush_denormal={args.flush_denormal}, compile={args.compile}, "
          f"eigen_update_freq={args.eigen_update_freq}; tekfac from "
          f"{Path(tekfac.__file__).parent}")
    rows = []
    for i in range(args.steps):
        start = torch.randint(0, len(tokens) - args.context - 1, (args.batch,), generator=gen)
        window = torch.stack([tokens[s:s + args.context + 1] for s in start.tolist()]).to(device)
        x, y = window[:, :-1], window[:, 1:]
        kind = ("eigen" if pre.steps % pre.config.eigen_update_freq == 0 else
                "statistics" if pre.statistics_due else "plain")
        timers.stages.clear()
        timers.step = pre.steps
        sync()
        t0 = clock()
        logits = forward(x)
        flat = logits.view(-1, args.vocab)
        loss = F.cross_entropy(flat, y.reshape(-1))
        opt.zero_grad()
        opt.backward(loss, flat)
        opt.step()
        sync()
        wall, cpu = since(t0)
        rows.append(dict(step=i, kind=kind, ms=wall, cpu_ms=cpu, loss=loss.item(),
                         stages=dict(timers.stages)))
    return opt, rows


def report(opt: tekfac.KroneckerOptimizer, rows: list[dict], attempts: list[dict],
           top: int) -> None:
    print(f"\nloss: first {rows[0]['loss']:.3f}, last {rows[-1]['loss']:.3f}; faults: "
          f"{dict(opt.faults) or 'none'}")
    print(f"\n{'step kind':<12}{'count':>6}{'median ms':>11}{'max ms':>10}"
          f"{'median CPU ms':>15}{'max CPU ms':>12}")
    for kind in ("plain", "statistics", "eigen", "all"):
        sel = [r for r in rows if kind in (r["kind"], "all")]
        if sel:
            wall, cpu = [r["ms"] for r in sel], [r["cpu_ms"] for r in sel]
            print(f"{kind:<12}{len(sel):>6}{statistics.median(wall):>11.1f}{max(wall):>10.1f}"
                  f"{statistics.median(cpu):>15.1f}{max(cpu):>12.1f}")

    print(f"\nslowest {top} steps (stage: wall / CPU ms):")
    for r in sorted(rows, key=lambda r: -r["ms"])[:top]:
        parts = ", ".join(f"{k} {w:.0f}/{c:.0f}" for k, (w, c) in sorted(r["stages"].items()))
        print(f"  step {r['step']:>4} {r['kind']:<10} {r['ms']:8.1f} ms   {parts}")

    firsts = [a for a in attempts if not a["retry"]]
    retries = [a for a in attempts if a["retry"]]
    with_subnormals = sum(a["subnormal"] > 0 for a in attempts)
    print(f"\neigh attempts: {len(firsts)} first tries ({sum(a['failed'] for a in firsts)} "
          f"failed, {sum(a['ms'] for a in firsts) / 1e3:.2f} s wall, "
          f"{sum(a['cpu_ms'] for a in firsts) / 1e3:.2f} s CPU), {len(retries)} float64 retries "
          f"({sum(a['failed'] for a in retries)} failed, "
          f"{sum(a['ms'] for a in retries) / 1e3:.2f} s wall); inputs holding float32 "
          f"subnormals: {with_subnormals}")
    for a in sorted(attempts, key=lambda a: -a["ms"])[:top]:
        print(f"  step {a['step']:>4}: {a['size']:>5}² {a['dtype']:<8} "
              f"{'retry' if a['retry'] else 'first'} {'failed' if a['failed'] else 'ok':<6} "
              f"{a['ms']:8.1f} ms wall {a['cpu_ms']:8.1f} ms CPU, "
              f"{a['subnormal']} subnormal entries")

    pre = opt.preconditioner
    print("\nlast basis per layer: size: largest / smallest positive eigenvalue (in, out)")
    for layer in pre.layers:
        state = pre.states[layer]
        if state.eig_in is None:
            continue
        ranges = []
        for eig in (state.eig_in, state.eig_out):
            positive = eig[eig > 0]
            low = f"{positive.min().item():.1e}" if len(positive) else "-"
            ranges.append(f"{len(eig)}: {eig.max().item():.1e} / {low}")
        print(f"  {layer.name:<22} in {ranges[0]:<28} out {ranges[1]}")

    fields = defaultdict(list)
    for state in pre.states.values():
        for key, value in state.to_dict().items():
            if value.is_floating_point() and value.dim() > 0:
                fields[key].append(value)
    print("\nfloat32 subnormal entries in the curvature state: " + ", ".join(
        f"{key} {c}/{n}" for key, (c, n) in ((k, subnormals(v)) for k, v in fields.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--method", default="tekfac", choices=list(tekfac.METHODS))
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True), as the benchmark does")
    parser.add_argument("--eigen-update-freq", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--busy", type=int, default=0,
                        help="competing processes that spin while it trains (a shared machine)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=5, help="slowest steps listed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.set_flush_denormal(args.flush_denormal) and args.flush_denormal:
        parser.error("this CPU cannot flush subnormals (torch.set_flush_denormal)")
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    timers = Timers(sync)
    timers.install()
    spinners = [mp.get_context("spawn").Process(target=busy, args=(3600.0,), daemon=True)
                for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        opt, rows = train(args, timers, sync)
    finally:
        for p in spinners:
            p.terminate()
    report(opt, rows, timers.attempts, args.top)


if __name__ == "__main__":
    main()
