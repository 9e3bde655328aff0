"""tekfac's KFAC side by side with gpauloski/kfac-pytorch on ``fmnist-autoencoder`` (issue #32).

The second, PyTorch, reference of ``benchmarks/peer_autoencoder.py``: the same network, data,
batches, schedule and test metric, both from the same PyTorch initial weights. kfac-pytorch is
never a dependency of tekfac; install it once, without its dependencies, beside the project::

    git clone https://github.com/gpauloski/kfac-pytorch /tmp/kfacpt-src   # or the fetch tool
    .venv/bin/pip install --no-deps --target /tmp/kfac-pytorch /tmp/kfacpt-src
    python benchmarks/peer_kfac_pytorch.py --peer-path /tmp/kfac-pytorch [--seeds 0 1]

kfac-pytorch's KFAC is the empirical Fisher of the loss it is given (the gradients of the
user's backward), Tikhonov damping of the Kronecker eigenvalues (``1/(λ_G λ_A + d)``),
factors that start from the identity and average as a plain EMA, ``torch.optim.SGD``'s momentum
on directions, and the KL clip at the preconditioner's ``lr``. It is given the loss summed
over images and pixels, so that its factors are those of the per-image sum (kfac-jax's units):
then its ``lr`` is tekfac's divided by the batch size, and damping and κ are kfac-jax's values
(docs/design.md §1). tekfac runs with the same Fisher and damping (``fisher="empirical"``,
``damping_type="eigenvalue"``) and its own averages and momentum (docs/design.md §4.1, §4.6).
Prints the test error every 40 steps and each one's training loss (per-image sum) for the
first ``--show`` steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_autoencoder import (  # the sibling script
    BATCH,
    BUDGET,
    DEFAULT_DATA,
    LAYER_NAMES,
    batches,
    load_images,
    rate,
    run_tekfac,
    torch_autoencoder,
    torch_test_error,
)

K = 784  # pixels: the loss's terms per image


def initial_weights(seed: int) -> dict[str, np.ndarray]:
    """PyTorch's initial weights of ``tekfac.bench.models.autoencoder`` for ``seed``, in the
    naming of ``peer_autoencoder.run_tekfac`` (haiku's: ``w`` is ``(d_in, d_out)``)."""
    import torch

    from tekfac.bench import models

    torch.manual_seed(seed)
    linears = [m for m in models.autoencoder() if isinstance(m, torch.nn.Linear)]
    weights = {}
    for layer, name in zip(linears, LAYER_NAMES, strict=True):
        weights[f"{name}/w"] = layer.weight.detach().T.numpy().copy()
        weights[f"{name}/b"] = layer.bias.detach().numpy().copy()
    return weights


def run_kfac_pytorch(args: argparse.Namespace, initial: dict[str, np.ndarray]
                     ) -> tuple[list[float], list[tuple[int, float]]]:
    """Train with kfac-pytorch's ``KFACPreconditioner`` and ``torch.optim.SGD``; the loss before
    every step (per-image sum) and the test errors."""
    import kfac
    import torch
    import torch.nn.functional as F

    train, test = load_images(args.data_dir, args.seed)
    test = torch.from_numpy(test)
    model, _ = torch_autoencoder(initial)
    lr = args.lr / BATCH  # the gradient of the sum over the batch is BATCH times the mean's
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)
    pre = kfac.preconditioner.KFACPreconditioner(
        model, factor_update_steps=1, inv_update_steps=args.eigen_every,
        damping=args.damping, factor_decay=args.stat_decay, kl_clip=args.norm_constraint,
        lr=lambda step: rate(step, lr, args.schedule))
    losses, errors = [], []
    for step, x in batches(train, args.seed, args.steps):
        for group in sgd.param_groups:
            group["lr"] = rate(step, lr, args.schedule)
        x = torch.from_numpy(x)
        out = model(x)
        loss = F.binary_cross_entropy_with_logits(out, x, reduction="sum")
        losses.append(loss.item() / BATCH)
        sgd.zero_grad()
        loss.backward()
        pre.step()
        sgd.step()
        if (step + 1) % 40 == 0 or step + 1 == args.steps:
            errors.append((step + 1, torch_test_error(model, test)))
    return losses, errors


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-path", default="/tmp/kfac-pytorch",
                   help="folder with kfac-pytorch installed (pip --no-deps --target)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=BUDGET)
    p.add_argument("--lr", type=float, default=1e-2, help="in tekfac's (and kfac-jax's) units")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--damping", type=float, default=1e-2, help="in kfac-jax's units")
    p.add_argument("--norm-constraint", type=float, default=1e-2, help="κ, kfac-jax's units")
    p.add_argument("--schedule", choices=["warmup-cosine", "constant"], default="warmup-cosine")
    p.add_argument("--stat-decay", type=float, default=0.95)
    p.add_argument("--eigen-every", type=int, default=5)
    p.add_argument("--show", type=int, default=12)
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    args = p.parse_args(argv)
    sys.path.insert(0, args.peer_path)
    print(f"values (kfac-jax's units): lr {args.lr}, momentum {args.momentum}, damping "
          f"{args.damping}, κ {args.norm_constraint}, {args.schedule}, empirical Fisher, "
          f"eigenvalue damping, statistics every step, inverses every {args.eigen_every}, "
          f"EMA {args.stat_decay}")
    summary = {}
    for seed in args.seeds:
        args.seed = seed
        initial = initial_weights(seed)
        peer_losses, peer_errors = run_kfac_pytorch(args, initial)
        ours = argparse.Namespace(**vars(args), fisher="empirical", method="kfac",
                                  damping_type="eigenvalue", factor_dtype="float32",
                                  units="loss", adaptive=False)
        losses, errors, _ = run_tekfac(ours, initial)
        print(f"\nseed {seed}: training loss before each step (per-image sum)")
        print("step  kfac-pytorch    tekfac")
        for step in range(min(args.show, args.steps)):
            print(f"{step + 1:4d} {peer_losses[step]:13.2f} {losses[step]:9.2f}")
        print("test error     " + "  ".join(f"{s:>7d}" for s, _ in peer_errors))
        print("kfac-pytorch   " + "  ".join(f"{e:7.2f}" for _, e in peer_errors))
        print("tekfac         " + "  ".join(f"{e:7.2f}" for _, e in errors))
        summary[seed] = dict(kfac_pytorch=peer_errors[-1][1], tekfac=errors[-1][1])
    print("\n" + json.dumps(summary))


if __name__ == "__main__":
    main()
