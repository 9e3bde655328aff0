"""The KL clip's curvature against the exact curvature of each step (issue #32 item 4).

    python benchmarks/kl_curvature.py [--task fmnist-autoencoder] [--method kfac] [--lr 0.01]
        [--damping 1.28e-5] [--kl-clip 1.28e-5] [--steps 60] [--seed 0]

Trains one benchmark run as ``tekfac tune`` does (the tuning split, batch 128, the warm-up and
cosine schedule over the task's budget, statistics every step, bases every 5, PyTorch's initial
weights for ``--seed``) and prints, for each step ``t``:

- the minibatch loss and the KL factor ``ν``;
- ``bound``: what the clip bounds by κ, ``lr_ref² ν² ⟨Δ, ∇⟩ = dᵀ(F̂ + λ)d · (lr_ref/lr)²`` for
  the step's new increment ``d = lr·ν·Δ`` (docs/design.md §4.5), computed here as
  ``lr_ref² ν ⟨d, ∇⟩ / lr``;
- ``exact``: ``dᵀ C d``, ``C`` the exact curvature (generalised Gauss–Newton, the Fisher of the
  loss's predictive distribution) of the minibatch loss at the weights before the step,
  by double backward (:mod:`tekfac.quadratic`);
- ``update``: ``uᵀ C u`` for the whole update ``u = θ_{t-1} − θ_t`` (the increment plus the
  momentum ``μ u_{t-1}``).

The clip assumes ``bound`` measures the step's curvature; where ``exact`` exceeds it by orders of
magnitude the KL bound cannot stop the step. The increments are recovered from the parameters
(``d_t = u_t − μ u_{t−1}``), so this needs heavy-ball momentum (the benchmark's).
"""

from __future__ import annotations

import argparse

import torch

from tekfac.bench.data import iterate_minibatches, load_dataset
from tekfac.bench.optimizers import SECOND_ORDER, make_optimizer, take_step, warmup_cosine_schedule
from tekfac.bench.tasks import TASKS
from tekfac.bench.tune import tuning_split
from tekfac.quadratic import jacobian_products, output_gram


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fmnist-autoencoder", choices=TASKS)
    parser.add_argument("--method", default="kfac", choices=SECOND_ORDER)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--damping", type=float, default=1.28e-5)
    parser.add_argument("--kl-clip", type=float, default=1.28e-5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    task = TASKS[args.task]
    split = tuning_split(load_dataset(task.dataset), task.train_size)
    values = dict(lr=args.lr, damping=args.damping, kl_clip=args.kl_clip, cov_update_freq=1,
                  eigen_update_freq=5, scale_update_freq=1)
    torch.manual_seed(args.seed)
    model, probe = task.build(), task.build()
    opt = make_optimizer(args.method, model, values, task.loss, task.weight_decay)
    group = opt.param_groups[0]
    total = task.epochs * (len(split.train_x) // 128)
    schedule = warmup_cosine_schedule(opt, total, task.warmup_fraction)
    shuffle = torch.Generator().manual_seed(args.seed)
    print(f"{args.task} {args.method} lr {args.lr} damping {args.damping} κ {args.kl_clip}")
    print(f"{'step':>4} {'loss':>10} {'ν':>8} {'bound':>10} {'exact':>10} {'update':>10}")
    previous = None
    step = 0
    while step < args.steps:
        for xb, yb in iterate_minibatches(split.train_x, split.train_y, 128, shuffle):
            before = [p.detach().clone() for p in model.parameters()]
            targets = task.targets(xb, yb)

            def compute(xb=xb, targets=targets):
                outputs = task.forward(model, task.inputs(xb))
                return task.loss_fn(outputs, targets), outputs

            loss = take_step(opt, compute).item()
            update = [b - p.detach() for b, p in zip(before, model.parameters())]
            increment = update if previous is None else [
                u - group["momentum"] * v for u, v in zip(update, previous)]
            previous = update
            with torch.no_grad():
                for q, b in zip(probe.parameters(), before):
                    q.copy_(b)
            params = list(probe.parameters())
            outputs = task.forward(probe, task.inputs(xb))
            grads = torch.autograd.grad(task.loss_fn(outputs, targets), params,
                                        retain_graph=True)
            gram = output_gram(task.loss, "mean", outputs,
                               jacobian_products(outputs, params, [increment, update]))
            nu = 1.0 if opt.kl_factor is None else float(opt.kl_factor)
            inner = sum((d * g).sum() for d, g in zip(increment, grads)).item()
            bound = group["kl_clip_lr"] ** 2 * nu * inner / group["lr"]
            print(f"{step:4d} {loss:10.4g} {nu:8.2g} {bound:10.3g} {gram[0, 0].item():10.3g} "
                  f"{gram[1, 1].item():10.3g}", flush=True)
            schedule.step()
            step += 1
            if step == args.steps:
                break


if __name__ == "__main__":
    main()
