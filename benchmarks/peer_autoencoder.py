"""tekfac's KFAC side by side with kfac-jax on ``fmnist-autoencoder`` (issue #32).

The same network (784-1000-500-250-30-250-500-1000-784, ReLU, none on the code layer and the
output), the same initial weights (kfac-jax's, haiku's initialisation), the same batches (a
random 20480 of the Fashion-MNIST training images, batch 128), the same schedule and the same
values, and the test metric of ``tekfac.bench.tasks`` (mean over the 10000 test images of
Σ pixels (sigmoid(logit) − x)²). kfac-jax's loss is the per-image sum over pixels (its
registered sigmoid cross-entropy), tekfac's the mean over pixels and images; the values are
mapped into tekfac's units by docs/design.md §1 (``--units``).

kfac-jax runs in a scratch environment, never a dependency of tekfac; set it up once::

    python benchmarks/peer_autoencoder.py --setup /tmp/peer-kfac-jax

(``jax==0.9.0 jaxlib==0.9.0 kfac-jax==0.0.8 optax dm-haiku``: kfac-jax 0.0.8 fails to trace
with jax 0.10.x.) Then, from the project's environment::

    python benchmarks/peer_autoencoder.py [--fisher mc|empirical] [--steps 320] [--seeds 0 1]
    python benchmarks/peer_autoencoder.py --adaptive [--damping 1.0] [--method tekfac]

``--adaptive`` runs both with the quadratic-model step (kfac-jax's adaptive learning rate and
momentum; tekfac's ``step_rule="quadratic"``) and Levenberg–Marquardt damping from ``--damping``
(every 5 steps, factor 0.95⁵, bounds 1e-5 and 1000 in the peer's units), no schedule, no norm
constraint: the issue's untuned reference.

prints, per seed, both libraries' training loss (per-image sum, before each step) for the first
``--show`` steps, their largest relative gap over the run, and the test error every 40 steps.
With ``--fisher empirical`` both are deterministic, so the losses must agree to float32
rounding until the trajectories part. The peer is run by this same file with ``--role
kfac-jax``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

WIDTHS = (1000, 500, 250, 30, 250, 500, 1000, 784)
LINEAR = (3, 7)  # layers without a ReLU after them
BATCH, TRAIN, STEPS_PER_EPOCH = 128, 20480, 160
BUDGET = 320  # steps of the task's budget (2 epochs), over which the schedule runs
PEER_PACKAGES = ("jax==0.9.0", "jaxlib==0.9.0", "kfac-jax==0.0.8", "optax", "dm-haiku")
DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
LAYER_NAMES = ["linear"] + [f"linear_{i}" for i in range(1, len(WIDTHS))]  # haiku's


def load_images(data_dir: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed's random 20480 training images and the 10000 test images, ``(n, 784)`` in
    [0, 1], float32."""
    def idx(name: str) -> np.ndarray:
        with gzip.open(Path(data_dir) / name) as f:
            data = f.read()
        return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 784).astype(np.float32) / 255
    train = idx("train-images-idx3-ubyte.gz")
    train = train[np.random.RandomState(seed).permutation(len(train))[:TRAIN]]
    return train, idx("t10k-images-idx3-ubyte.gz")


def batches(train: np.ndarray, seed: int, steps: int):
    """``(step, images)`` for the run's ``steps`` batches: each epoch a fresh permutation."""
    step = 0
    for epoch in range(math.ceil(steps / STEPS_PER_EPOCH)):
        order = np.random.RandomState(seed * 100 + epoch).permutation(TRAIN)
        for b in range(STEPS_PER_EPOCH):
            if step == steps:
                return
            yield step, train[order[b * BATCH:(b + 1) * BATCH]]
            step += 1


def rate(step: int, lr: float, schedule: str) -> float:
    """optax's ``warmup_cosine_decay_schedule(0, lr, BUDGET // 20, BUDGET, 0)`` (5 % linear
    warm-up from 0, cosine to 0 at the budget), or ``lr`` for ``schedule="constant"``."""
    if schedule == "constant":
        return lr
    warm = BUDGET // 20
    if step < warm:
        return lr * step / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / (BUDGET - warm)))


# ----------------------------------------------------------------------------- kfac-jax
def run_kfac_jax(args: argparse.Namespace, out: Path) -> None:
    """Train with kfac-jax (in its scratch environment) and save the initial weights, the
    loss before every step and the test errors to ``out`` (``.npz``)."""
    import haiku as hk
    import jax
    import jax.numpy as jnp
    import kfac_jax
    import optax

    train, test = load_images(args.data_dir, args.seed)

    def net(x):
        h = x
        for i, width in enumerate(WIDTHS):
            h = hk.Linear(width)(h)
            if i not in LINEAR:
                h = jax.nn.relu(h)
        return h

    model = hk.without_apply_rng(hk.transform(net))

    def loss_fn(params, x):
        logits = model.apply(params, x)
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, x)
        return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=-1))

    @jax.jit
    def test_error(params):
        return sum(jnp.sum((jax.nn.sigmoid(model.apply(params, test[s:s + 2000]))
                            - test[s:s + 2000]) ** 2) for s in range(0, 10000, 2000)) / 10000

    key = jax.random.PRNGKey(args.seed)
    params = model.init(key, train[:BATCH])
    initial = {f"{name}/{p}": np.asarray(v) for name, layer in params.items()
               for p, v in layer.items()}
    if args.adaptive:
        rule = dict(use_adaptive_learning_rate=True, use_adaptive_momentum=True,
                    use_adaptive_damping=True, initial_damping=args.damping, min_damping=1e-5,
                    max_damping=1000.0, damping_adaptation_interval=5,
                    damping_adaptation_decay=0.95)
    else:
        rule = dict(
            learning_rate_schedule=(optax.constant_schedule(args.lr)
                                    if args.schedule == "constant"
                                    else optax.warmup_cosine_decay_schedule(
                                        0.0, args.lr, BUDGET // 20, BUDGET, 0.0)),
            momentum_schedule=optax.constant_schedule(args.momentum),
            damping_schedule=optax.constant_schedule(args.damping),
            norm_constraint=args.norm_constraint)
    optimizer = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
        estimation_mode="fisher_gradients" if args.fisher == "mc" else "fisher_empirical",
        inverse_update_period=args.eigen_every, curvature_ema=args.stat_decay,
        num_burnin_steps=0, multi_device=False, **rule)
    state = optimizer.init(params, key, train[:BATCH])
    losses, errors, updates = [], [], []
    for step, x in batches(train, args.seed, args.steps):
        key, sub = jax.random.split(key)
        old = {n: np.concatenate([np.ravel(params[n]["w"]), params[n]["b"]]) for n in LAYER_NAMES}
        params, state, stats = optimizer.step(params, state, sub, batch=x, global_step_int=step)
        losses.append(float(stats["loss"]))
        updates.append([float(np.linalg.norm(np.concatenate(
            [np.ravel(params[n]["w"]), params[n]["b"]]) - old[n])) for n in LAYER_NAMES])
        if (step + 1) % 40 == 0 or step + 1 == args.steps:
            errors.append((step + 1, float(test_error(params))))
    np.savez(out, losses=np.array(losses), errors=np.array(errors), updates=np.array(updates),
             **initial)


# ----------------------------------------------------------------------------- tekfac
def torch_autoencoder(initial: dict[str, np.ndarray]):
    """``tekfac.bench.models.autoencoder`` with the ``initial`` weights (haiku's names and
    layout, ``w`` of shape ``(d_in, d_out)``) and its Linear layers."""
    import torch

    from tekfac.bench import models

    model = models.autoencoder()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer, name in zip(linears, LAYER_NAMES, strict=True):
            layer.weight.copy_(torch.from_numpy(initial[f"{name}/w"]).T)
            layer.bias.copy_(torch.from_numpy(initial[f"{name}/b"]))
    return model, linears


def torch_test_error(model, test) -> float:
    """The task's test metric of a PyTorch ``model`` on the ``(10000, 784)`` ``test`` images."""
    import torch

    with torch.no_grad():
        return sum(((torch.sigmoid(model(test[s:s + 2000])) - test[s:s + 2000]) ** 2)
                   .sum().item() for s in range(0, 10000, 2000)) / 10000


def run_tekfac(args: argparse.Namespace, initial: dict[str, np.ndarray]
               ) -> tuple[list[float], list[tuple[int, float]], list[list[float]]]:
    """Train tekfac's KFAC from kfac-jax's initial weights on the same batches, with the
    values mapped into tekfac's units; the loss before every step (per-image sum), the test
    errors and the norm of every layer's update at every step."""
    import torch
    import torch.nn.functional as F

    import tekfac

    train, test = load_images(args.data_dir, args.seed)
    test = torch.from_numpy(test)
    model, linears = torch_autoencoder(initial)
    k = 784.0
    lr, damping, kl_clip = args.lr, args.damping, args.norm_constraint
    if args.units == "fisher":  # curvature of the per-image mean's Fisher: 1/K² of the peer's
        lr, damping, kl_clip = lr / k, damping / k**2, (kl_clip and kl_clip / k**2)
    else:  # the curvature of tekfac's loss, 1/K of the per-image sum's
        damping, kl_clip = damping / k, (kl_clip and kl_clip / k)
    if args.adaptive:  # the quadratic model's rate and momentum, LM damping (floor 1e-5)
        rule = dict(step_rule="quadratic", damping_adaptive=True, damping_floor=1e-5 / k)
    else:
        rule = dict(lr=lr, momentum=args.momentum, kl_clip=kl_clip)
    opt = tekfac.KroneckerOptimizer(
        model, args.method, damping=damping, damping_type=args.damping_type,
        stat_decay=args.stat_decay, fisher=args.fisher, loss="bce_with_logits",
        cov_update_freq=getattr(args, "stats_every", 1), eigen_update_freq=args.eigen_every,
        scale_update_freq=getattr(args, "stats_every", 1),
        factor_dtype=getattr(torch, args.factor_dtype), seed=args.seed, **rule)
    losses, errors, updates = [], [], []
    for step, x in batches(train, args.seed, args.steps):
        old = [torch.cat([la.weight.detach().flatten(), la.bias.detach()]) for la in linears]
        if not args.adaptive:  # kfac-jax's norm constraint is at the current rate
            for group in opt.param_groups:
                group["lr"] = group["kl_clip_lr"] = rate(step, lr, args.schedule)
        x = torch.from_numpy(x)

        def closure(x=x):
            opt.zero_grad()
            out = model(x)
            loss = F.binary_cross_entropy_with_logits(out, x)
            opt.backward(loss, out)
            return loss

        losses.append(opt.step(closure).item() * k)
        updates.append([float((torch.cat([la.weight.detach().flatten(), la.bias.detach()]) - o)
                              .norm()) for la, o in zip(linears, old)])
        if (step + 1) % 40 == 0 or step + 1 == args.steps:
            errors.append((step + 1, torch_test_error(model, test)))
    return losses, errors, updates


# ----------------------------------------------------------------------------- driver
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", metavar="DIR", help="create the peer's scratch environment in DIR")
    p.add_argument("--peer-python", default="/tmp/peer-kfac-jax/bin/python",
                   help="the python of the peer's environment")
    p.add_argument("--role", choices=["kfac-jax"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=BUDGET,
                   help="steps to run (the schedule always spans the budget of 320)")
    p.add_argument("--fisher", choices=["mc", "empirical"], default="mc")
    p.add_argument("--method", default="kfac", help="tekfac's method (kfac-jax runs KFAC)")
    p.add_argument("--damping-type", default="pi",
                   help="tekfac's damping_type (kfac-jax's is 'pi'; EKFAC/TEKFAC need another)")
    p.add_argument("--lr", type=float, default=1e-2, help="in the peer's units")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--damping", type=float, default=1e-2,
                   help="in the peer's units (the initial value with --adaptive)")
    p.add_argument("--adaptive", action="store_true",
                   help="the quadratic-model step and LM damping (see above)")
    p.add_argument("--norm-constraint", type=float, default=1e-2,
                   help="kfac-jax's norm constraint (tekfac's kl_clip), in the peer's units")
    p.add_argument("--schedule", choices=["warmup-cosine", "constant"], default="warmup-cosine")
    p.add_argument("--stat-decay", type=float, default=0.95)
    p.add_argument("--eigen-every", type=int, default=5)
    p.add_argument("--stats-every", type=int, default=1,
                   help="tekfac's statistics interval (kfac-jax's is 1)")
    p.add_argument("--factor-dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--units", choices=["loss", "fisher"], default="loss",
                   help="how tekfac's values are mapped: 'loss' (tekfac's curvature is that of "
                        "its loss, 1/784 of the peer's) or 'fisher' (the Fisher of the "
                        "per-image mean, 1/784²: tekfac before issue #32)")
    p.add_argument("--show", type=int, default=12, help="steps printed side by side")
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    return p.parse_args(argv)


def peer_arguments(args: argparse.Namespace, seed: int, out: Path) -> list[str]:
    """The command line that runs the peer with this run's values."""
    values = ["--steps", args.steps, "--fisher", args.fisher, "--lr", args.lr, "--momentum",
              args.momentum, "--damping", args.damping, "--schedule", args.schedule,
              "--stat-decay", args.stat_decay, "--eigen-every", args.eigen_every,
              "--data-dir", args.data_dir, "--seed", seed, "--out", out]
    if args.adaptive:
        values += ["--adaptive"]
    if args.norm_constraint:
        values += ["--norm-constraint", args.norm_constraint]
    return [str(v) for v in values]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.setup:
        subprocess.run([sys.executable, "-m", "venv", args.setup], check=True)
        subprocess.run([f"{args.setup}/bin/python", "-m", "pip", "install", "-q",
                        *PEER_PACKAGES], check=True)
        return
    if args.role == "kfac-jax":
        run_kfac_jax(args, Path(args.out))
        return
    if args.norm_constraint == 0 or args.adaptive:
        args.norm_constraint = None
    print(f"values (peer's units): lr {args.lr}, momentum {args.momentum}, damping "
          f"{args.damping}, norm constraint {args.norm_constraint}, {args.schedule}, "
          f"{args.fisher} Fisher, statistics every step, inverses every {args.eigen_every}, "
          f"EMA {args.stat_decay}; tekfac {args.method} ({args.damping_type} damping) in "
          f"{args.units} units")
    summary = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "peer.npz"
            subprocess.run([args.peer_python, __file__, "--role", "kfac-jax",
                            *peer_arguments(args, seed, out)], check=True)
            peer = dict(np.load(out))
        losses, errors, updates = run_tekfac(args, peer)
        peer_losses, peer_updates = peer.pop("losses"), peer.pop("updates")
        peer_errors = [(int(s), e) for s, e in peer.pop("errors")]
        print(f"\nseed {seed}: training loss before each step (per-image sum); each layer's "
              "update norm, tekfac's / kfac-jax's")
        layers = " ".join(f"{i:>5d}" for i in range(len(WIDTHS)))
        print(f"step  kfac-jax    tekfac   rel. gap   {layers}")
        for step in range(min(args.show, args.steps)):
            gap = abs(losses[step] - peer_losses[step]) / abs(peer_losses[step])
            ratios = " ".join(f"{u / max(v, 1e-30):5.2f}" for u, v in
                              zip(updates[step], peer_updates[step]))
            print(f"{step + 1:4d} {peer_losses[step]:9.2f} {losses[step]:9.2f}  {gap:9.2e}   "
                  f"{ratios}")
        gaps = np.abs(np.array(losses) - peer_losses) / np.abs(peer_losses)
        first = next((s + 1 for s, g in enumerate(gaps) if g > 1e-3), None)
        print(f"largest gap {np.nanmax(gaps):.2e}; first step with a gap > 1e-3: {first}")
        print("test error   " + "  ".join(f"{s:>7d}" for s, _ in peer_errors))
        print("kfac-jax     " + "  ".join(f"{e:7.2f}" for _, e in peer_errors))
        print("tekfac       " + "  ".join(f"{e:7.2f}" for _, e in errors))
        summary[seed] = dict(kfac_jax=peer_errors[-1][1], tekfac=errors[-1][1],
                             first_gap_step=first)
    print("\n" + json.dumps(summary))


if __name__ == "__main__":
    main()
