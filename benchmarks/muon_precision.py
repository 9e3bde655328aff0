"""Cost of Muon's Newton–Schulz iteration on this CPU: torch's bfloat16 against float32.

Times (median of ``--repeats``) one orthogonalisation of each Muon-held weight shape of the
Fashion-MNIST autoencoder, with ``torch.optim.Muon``'s own bfloat16 iteration and with
:func:`tekfac.bench.muon.newton_schulz_float32`, and prints their ratio and the sum over the
shapes (the iteration's share of one Muon step), with the float32 result's relative
difference from the bfloat16 one.

    python benchmarks/muon_precision.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.optim._muon as torch_muon

from tekfac.bench.models import autoencoder
from tekfac.bench.muon import newton_schulz_float32
from tekfac.bench.optimizers import muon_split

COEFFICIENTS, STEPS, EPS = (3.4445, -4.7750, 2.0315), 5, 1e-7


def _median_seconds(fn, update: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(update, COEFFICIENTS, STEPS, EPS)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [tuple(p.shape) for p in muon_split(autoencoder())[0]]
    print(f"{args.threads} torch threads; median of {args.repeats}")
    print(f"{'shape':>12} {'bfloat16 s':>11} {'float32 s':>10} {'ratio':>6} {'rel diff':>9}")
    total_bf16 = total_f32 = 0.0
    for shape in shapes:
        update = torch.randn(*shape)
        bf16 = _median_seconds(torch_muon._zeropower_via_newtonschulz, update, args.repeats)
        f32 = _median_seconds(newton_schulz_float32, update, args.repeats)
        ref = newton_schulz_float32(update, COEFFICIENTS, STEPS, EPS)
        other = torch_muon._zeropower_via_newtonschulz(update, COEFFICIENTS, STEPS, EPS).float()
        diff = ((other - ref).norm() / ref.norm()).item()
        total_bf16, total_f32 = total_bf16 + bf16, total_f32 + f32
        print(f"{shape!s:>12} {bf16:11.3f} {f32:10.3f} {bf16 / f32:6.1f} {diff:9.1e}")
    print(f"{'all':>12} {total_bf16:11.3f} {total_f32:10.3f} {total_bf16 / total_f32:6.1f}")


if __name__ == "__main__":
    main()
