"""Rank-k eigenbases on the Fashion-MNIST autoencoder: time saved, accuracy lost (issue #17).

Time: TEKFAC's median step (statistics steps excluded, they are every 10th) on one real batch
of 128 images for each ``basis_rank``, rounds interleaved, with the ratio to full bases
measured in the same round. Accuracy: after ``--steps`` full-rank steps on successive batches,
the gradient of a batch not seen yet, preconditioned by each layer with its bases truncated
to ``k`` (the top ``k`` eigenvectors of each
side, the corrected scaling carried exactly onto the truncated grid, i.e. the block averages
of the full ``F̂``'s diagonal) against the full one, ``‖Δ_k − Δ‖ / ‖Δ‖``, largest over the
layers, at three dampings (the remainder's error is hidden where the damping dominates its
small eigenvalues, as it does on this autoencoder, whose Fisher is scaled by 1/784²).

    python benchmarks/basis_rank.py [--ranks 256 128 64 32] [--steps 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tekfac.bench.data import load_dataset
from tekfac.bench.optimizers import make_optimizer, take_step
from tekfac.bench.tasks import TASKS
from tekfac.damping import eigenvalue_damping
from tekfac.truncation import carry_weights, merge, scale, split, truncate

TASK = TASKS["fmnist-autoencoder"]
HPARAMS = {"lr": 0.01, "damping": 1e-3}


def build(rank: int | None):
    torch.manual_seed(0)
    model = TASK.build()
    opt = make_optimizer("tekfac", model, HPARAMS, TASK.loss, 0.0, basis_rank=rank)
    return model, opt


def step(model, opt, x) -> None:
    def compute():
        out = model(TASK.inputs(x))
        return TASK.loss_fn(out, TASK.targets(x, None)), out
    take_step(opt, compute)


def median_step_ms(rank: int | None, x, steps: int) -> float:
    model, opt = build(rank)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(model, opt, x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(t for i, t in enumerate(times) if i % 10)


def truncated_direction(state, grad: torch.Tensor, k: int, damping: float) -> torch.Tensor:
    """The layer's preconditioned ``grad`` with both bases truncated to ``k`` vectors."""
    bases, grids = {}, {}
    for side in ("in", "out"):
        basis, eig = getattr(state, f"basis_{side}"), getattr(state, f"eig_{side}")
        bases[side] = None if basis is None else truncate(eig, basis, k)[1]
        grids[side] = None if basis is None else carry_weights(bases[side], basis, len(basis))
    s = state.scaling
    if grids["out"] is not None:
        s = grids["out"] @ s
    if grids["in"] is not None:
        s = s @ grids["in"].T
    k_out = bases["out"].shape[1] if bases["out"] is not None else s.shape[0]
    k_in = bases["in"].shape[1] if bases["in"] is not None else s.shape[1]
    pieces = split(grad, bases["out"], bases["in"])
    d = eigenvalue_damping(s, damping)
    return merge(scale(pieces, d, k_out, k_in, divide=True), bases["out"], bases["in"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[256, 128, 64, 32])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    images = load_dataset(TASK.dataset).train_x
    x = images[:128]
    ranks = [None, *args.ranks]
    times = {r: [] for r in ranks}
    for _ in range(args.rounds):
        for r in ranks:
            times[r].append(median_step_ms(r, x, args.steps))
    model, opt = build(None)
    for i in range(args.steps):
        step(model, opt, images[128 * i:128 * (i + 1)])
    opt.zero_grad()
    fresh = images[128 * args.steps:128 * (args.steps + 1)]
    out = model(TASK.inputs(fresh))
    TASK.loss_fn(out, TASK.targets(fresh, None)).backward()
    pre = opt.preconditioner
    print(f"fmnist-autoencoder, TEKFAC, batch 128, {args.rounds} rounds x {args.steps} steps, "
          f"{torch.get_num_threads()} threads; accuracy after {args.steps} full-rank steps")
    dampings = (1e-3, 1e-4, 1e-5)
    print(f"{'rank':>6} {'step ms':>9} {'x full':>7}  relative error of the direction, largest "
          f"over the layers, at damping {' / '.join(f'{d:g}' for d in dampings)}")
    for r in ranks:
        ratio = statistics.median(t / f for t, f in zip(times[r], times[None]))
        errors = []
        if r is not None:
            for damping in dampings:
                worst = 0.0
                for layer in pre.layers:
                    state, grad = pre.states[layer], layer.gradient_matrix()
                    full = truncated_direction(state, grad, 10**9, damping)
                    approx = truncated_direction(state, grad, r, damping)
                    worst = max(worst, float((approx - full).norm() / full.norm()))
                errors.append(worst)
        shown = " / ".join(f"{e:.3g}" for e in errors) if errors else "-"
        print(f"{r!s:>6} {statistics.median(times[r]):>9.0f} {ratio:>7.2f}  {shown}")


if __name__ == "__main__":
    main()
