"""FSDP2 (``fully_shard``, parameters as ``DTensor``) and HSDP with gloo on CPU: the same steps
as DDP and as one process on the concatenated batch, curvature held by its owners, and the
refusals (docs/design.md §5, "Sharded parameters")."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tekfac
import tekfac.distributed
import tekfac.fisher
from tests.conftest import MeanOverSequence, Tokens, argmax_labels, curvature_of
from tests.test_distributed import FAST, _init, launch

fsdp = pytest.importorskip("torch.distributed.fsdp")
fully_shard = fsdp.fully_shard
STEPS = 5
PER_RANK = 20  # ≥ 29 examples in all: full-rank factors, so the eigenbases are unique


def conv_net() -> nn.Module:
    """Conv2d with 3 output channels (uneven over 2 ranks), Linear with and without bias."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(27, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()


def token_net() -> nn.Module:
    """An embedding (padding token 0) feeding a linear head."""
    torch.manual_seed(0)
    return nn.Sequential(Tokens(6), nn.Embedding(6, 4, padding_idx=0), nn.Tanh(),
                         MeanOverSequence(), nn.Linear(4, 3)).double()


def data(kind: str, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    shape = (2, 5, 5) if kind == "conv" else (5,)
    return [(torch.randn(world * PER_RANK, *shape, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (world * PER_RANK,), generator=gen)) for _ in range(STEPS)]


def groups(net: nn.Module) -> list[dict]:
    """Two param groups: coupled weight decay at one rate, decoupled at another."""
    params = list(net.parameters())
    return [{"params": params[:2], "weight_decay": 1e-2},
            {"params": params[2:], "lr": 0.02, "weight_decay": 1e-2,
             "decoupled_weight_decay": True}]


def run(model: nn.Module, opt, batches, mc: bool, micro: int = 1,
        scaler: torch.amp.GradScaler | None = None) -> None:
    """Cross-entropy steps, each over ``micro`` accumulated micro-batches."""
    for x, y in batches:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            out = model(xs)
            loss = F.cross_entropy(out, ys) / micro
            loss = scaler.scale(loss) if scaler else loss
            if mc:
                opt.backward(loss, out)
            else:
                loss.backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


def build(kind: str, method: str, fisher: str, wrap: str, **options):
    """``(model, optimizer)`` for one process (``wrap="none"``), DDP, or FSDP2 sharding every
    tracked layer and the root (``"fsdp"``) or the root only (``"fsdp-root"``)."""
    net = conv_net() if kind == "conv" else token_net()
    model = net
    if wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(net)
    elif wrap.startswith("fsdp"):
        if wrap == "fsdp":
            for module in net:
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                    fully_shard(module)
        fully_shard(net)
    opt = tekfac.KroneckerOptimizer(model, method, params=groups(net), fisher=fisher,
                                    **FAST, **options)
    return net, model, opt


def full_parameters(net: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in net.parameters()]


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((p - q).detach().norm() / q.detach().norm()) for p, q in zip(a, b))


def _equal_to_ddp_and_one_process(rank, world, tmp, kind, wrap, micro, scaled):
    """Every method × both Fishers: FSDP2 ('auto' = curvature on owners, and 'replicated')
    takes DDP's steps and the single process's, float64 to 1e-12 (measured: ≤ 5e-16)."""
    tekfac.fisher.sample_targets = argmax_labels  # the same MC labels however split
    batches = data(kind, world)
    cases = [(m, f) for m in tekfac.METHODS for f in ("empirical", "mc")]
    references = {}
    for method, fisher in cases:  # one process on the concatenated batches, no group yet
        net, model, opt = build(kind, method, fisher, "none")
        run(model, opt, batches, fisher == "mc", micro)
        references[method, fisher] = full_parameters(net)
    _init(rank, world, tmp)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = [(x[shard], y[shard]) for x, y in batches]
    for method, fisher in cases:
        mc = fisher == "mc"
        ddp_net, ddp, ddp_opt = build(kind, method, fisher, "ddp")
        run(ddp, ddp_opt, local, mc, micro)
        expected = full_parameters(ddp_net)
        for mode in ("auto", "replicated"):
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
            net, model, opt = build(kind, method, fisher, wrap, distributed_mode=mode,
                                    grad_scaler=scaler)
            pre = opt.preconditioner
            assert pre.sharded and (pre.work.owners is not None) == (mode == "auto")
            run(model, opt, local, mc, micro, scaler)
            got = full_parameters(net)
            assert relative(got, expected) <= 1e-12, (method, fisher, mode)
            # full-rank factors: unique bases, so the corrected scalings agree as well
            assert relative(got, references[method, fisher]) <= 1e-12, (method, fisher, mode)
            buffers = [opt.state[p]["momentum_buffer"] for p in net.parameters()]
            assert all(type(b) is type(p) for b, p in zip(buffers, net.parameters()))
            if mode == "auto":  # each layer's curvature on its owner only
                for layer in pre.layers:
                    state = pre.states[layer]
                    assert (state.factor_in is not None) == pre.work.mine(layer), layer.name
                    assert (state.scaling is not None) == pre.work.mine(layer), layer.name


@pytest.mark.parametrize(("kind", "wrap", "micro", "scaled"),
                         [("conv", "fsdp", 1, False), ("token", "fsdp-root", 2, True)])
def test_fsdp2_takes_the_steps_of_ddp_and_of_one_process(tmp_path, kind, wrap, micro, scaled):
    """Per-module sharding of a CNN (uneven shards, bias and none, two param groups with both
    kinds of weight decay, KL clip), and root sharding of an embedding net with gradient
    accumulation and a GradScaler."""
    launch(_equal_to_ddp_and_one_process, 2, tmp_path, kind, wrap, micro, scaled)


def test_fsdp2_on_three_ranks(tmp_path):
    launch(_equal_to_ddp_and_one_process, 3, tmp_path, "conv", "fsdp", 1, False)


def _refusals(rank, world, tmp):
    _init(rank, world, tmp)
    net = conv_net()
    early = tekfac.KFAC(net, fisher="empirical")  # built before sharding
    fully_shard(net)
    x, y = data("conv", 1)[0]
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(RuntimeError, match="after fully_shard"):
        early.step()
    for option in (dict(step_rule="quadratic"), dict(damping_adaptive=True)):
        with pytest.raises(ValueError, match="FSDP2"):
            tekfac.TEKFAC(net, **option)
    fsdp1 = fsdp.FullyShardedDataParallel(conv_net(), device_id=torch.device("cpu"))
    with pytest.raises(ValueError, match="FSDP1"):
        tekfac.TEKFAC(fsdp1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    tp = parallelize_module(conv_net(), init_device_mesh("cpu", (world,)),
                            {"3": ColwiseParallel()})
    with pytest.raises(ValueError, match="tensor parallelism"):
        tekfac.TEKFAC(tp)


def test_refusals_on_a_sharded_model(tmp_path):
    """An optimizer built before ``fully_shard`` is refused at its first step; the step
    rules that need the whole parameter vector at once, FSDP1 and tensor parallelism are
    refused at construction."""
    launch(_refusals, 2, tmp_path)


def test_a_failed_collective_reports_its_own_cause():
    """An error that is not a lost peer is not blamed on another rank."""
    comm = tekfac.distributed.Communicator()

    def bad(*args, **kwargs):
        raise RuntimeError("aten.mm: no sharding strategy registered")

    with pytest.raises(RuntimeError, match=r"failed: aten\.mm") as info:
        comm._call(bad)
    assert "crashed" not in str(info.value)
    assert dist.is_available()


# ------------------------------------------------------------------------- checkpoints
def _states(model: nn.Module, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _load(model: nn.Module, opt, path) -> None:
    """Resume through torch.distributed.checkpoint into a fresh optimizer's template."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    template = _states(model, opt)
    assert opt.preconditioner.steps == 0  # taking the template took no step
    dcp.load(template, checkpoint_id=str(path))
    set_model_state_dict(model, template["model"])
    set_optimizer_state_dict(model, opt, template["optim"])


def _dcp_resume(rank, world, tmp, wrap, method, mode):
    """Save at step 3 with DCP, resume in a fresh optimizer: bit-identical steps (MC Fisher,
    each rank's own labels)."""
    import torch.distributed.checkpoint as dcp
    _init(rank, world, tmp)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    batches = [(x[shard], y[shard]) for x, y in data("conv", world)]
    net, model, opt = build("conv", method, "mc", wrap, distributed_mode=mode)
    run(model, opt, batches[:3], mc=True)
    dcp.save(_states(model, opt), checkpoint_id=str(tmp / "ckpt"))
    run(model, opt, batches[3:], mc=True)
    net2, model2, opt2 = build("conv", method, "mc", wrap, distributed_mode=mode)
    _load(model2, opt2, tmp / "ckpt")
    pre, pre2 = opt.preconditioner, opt2.preconditioner
    assert pre2.steps == 3
    assert all(pre2.states[la].factor_in is not None for la in pre2.layers if pre2.work.mine(la))
    run(model2, opt2, batches[3:], mc=True)
    for p, q in zip(full_parameters(net), full_parameters(net2)):
        assert torch.equal(p, q), method
    assert pre.steps == pre2.steps == STEPS


@pytest.mark.parametrize(("wrap", "mode"), [("ddp", "replicated"), ("ddp", "owner"),
                                            ("fsdp", "auto")])
def test_dcp_resume_is_exact(tmp_path, wrap, mode):
    """DDP with replicated or owner-held curvature (gathered into every rank's state dict),
    and FSDP2 (each rank's own layers)."""
    for method in ("kfac", "tekfac"):
        (tmp_path / method).mkdir()
        launch(_dcp_resume, 2, tmp_path / method, wrap, method, mode)


def _save_on(rank, world, tmp):
    """Two ranks: save at step 3 and finish; the final parameters to a file."""
    import torch.distributed.checkpoint as dcp
    tekfac.fisher.sample_targets = argmax_labels
    _init(rank, world, tmp)
    batches = data("conv", 3)  # 60 examples per step, split over the ranks
    n = len(batches[0][1]) // world
    local = [(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]) for x, y in batches]
    net, model, opt = build("conv", "tekfac", "mc", "fsdp")
    run(model, opt, local[:3], mc=True)
    dcp.save(_states(model, opt), checkpoint_id=str(tmp / "ckpt"))
    run(model, opt, local[3:], mc=True)
    final = full_parameters(net)
    if rank == 0:
        torch.save(final, tmp / "final.pt")


def _resume_on(rank, world, tmp):
    """Three ranks: resume the two ranks' checkpoint and take the same last steps."""
    tekfac.fisher.sample_targets = argmax_labels
    _init(rank, world, tmp)
    batches = data("conv", 3)
    n = len(batches[0][1]) // world
    local = [(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]) for x, y in batches]
    net, model, opt = build("conv", "tekfac", "mc", "fsdp")
    _load(model, opt, tmp / "ckpt")
    run(model, opt, local[3:], mc=True)
    expected = torch.load(tmp / "final.pt", weights_only=True)
    assert relative(full_parameters(net), expected) <= 1e-12


def test_dcp_resume_on_another_number_of_ranks(tmp_path):
    """FSDP2: saved by 2 ranks, resumed by 3 (other owners, other shards): the same steps to
    1e-12 (the statistics' sums run in another order, so not bit-identical)."""
    launch(_save_on, 2, tmp_path)
    (tmp_path / "pg").unlink(missing_ok=True)
    launch(_resume_on, 3, tmp_path)


def _trained(method: str = "tekfac"):
    net = conv_net()
    opt = tekfac.KroneckerOptimizer(net, method, params=groups(net), **FAST)
    run(net, opt, data("conv", 1)[:3], mc=True)
    return net, opt


def test_a_state_dict_without_tekfac_state_is_refused():
    net, opt = _trained()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="no tekfac state"):
        opt.load_state_dict(sgd.state_dict())


def test_state_keys_written_as_strings_still_attach_and_unknown_keys_are_refused():
    """A flattening tool may give the state's parameter ids as strings: they name the same
    parameters (torch.optim would drop them silently); a key that names none is refused."""
    net, opt = _trained()
    saved = opt.state_dict()
    as_strings = {**saved, "state": {str(k): v for k, v in saved["state"].items()}}
    twin_net = copy.deepcopy(net)
    twin = tekfac.KroneckerOptimizer(twin_net, "tekfac", params=groups(twin_net), **FAST)
    twin.load_state_dict(as_strings)
    for p, q in zip(net.parameters(), twin_net.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], twin.state[q]["momentum_buffer"])
    with pytest.raises(ValueError, match="names no parameter"):
        twin.load_state_dict({**saved, "state": {**saved["state"], 99: {}}})


def test_a_fresh_state_dict_is_a_complete_template():
    """Before any step: an entry per parameter, zero momentum buffers (read back as none),
    every curvature field with its flags unset; loading it changes nothing."""
    net = conv_net()
    opt = tekfac.KroneckerOptimizer(net, "tekfac", params=groups(net), **FAST)
    template = opt.state_dict()
    assert not any(opt.state.values())  # taking it added nothing to the live state
    assert len(template["state"]) == len(list(net.parameters()))
    assert all(not e["momentum_buffer"].any() for e in template["state"].values())
    layers = curvature_of(template)["layers"]
    assert all(not entry["set"].any() for entry in layers.values())
    opt.load_state_dict(template)
    assert not any("momentum_buffer" in opt.state[p] for p in net.parameters())
    run(net, opt, data("conv", 1)[:1], mc=True)  # and trains


def _hsdp(rank, world, tmp):
    """HSDP: a (replicate 2 × shard 2) mesh takes DDP's steps on the same 4 ranks, the
    statistics averaged over the whole mesh and the curvature split over all 4 ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    tekfac.fisher.sample_targets = argmax_labels
    _init(rank, world, tmp)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = [(x[shard], y[shard]) for x, y in data("conv", world)]
    for method in ("kfac", "tekfac"):
        ddp_net, ddp, ddp_opt = build("conv", method, "mc", "ddp")
        run(ddp, ddp_opt, local, mc=True)
        net = conv_net()
        for module in net:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fully_shard(module, mesh=mesh)
        fully_shard(net, mesh=mesh)
        assert len(net[0].weight.placements) == 2  # (Replicate(), Shard(0))
        opt = tekfac.KroneckerOptimizer(net, method, params=groups(net), fisher="mc", **FAST)
        run(net, opt, local, mc=True)
        assert relative(full_parameters(net), full_parameters(ddp_net)) <= 1e-12, method
        owners = set(opt.preconditioner.work.owners.values())
        assert owners == {0, 1, 2}, owners  # 3 layers over the 4 ranks of the mesh


def test_hsdp_on_a_2x2_mesh(tmp_path):
    launch(_hsdp, 4, tmp_path)


def test_the_fsdp2_example_runs_under_torchrun(tmp_path):
    """``examples/fsdp2_digits.py`` as the README gives it: 2 ranks, a DCP resume halfway."""
    script = Path(__file__).parent.parent / "examples" / "fsdp2_digits.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), "--steps", "6", "--checkpoint", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(v) for v in done.stdout.split("losses:")[1].split()]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)


def _bad_batch_on_one_rank(rank, world, tmp):
    """Rank 1's part of batch 2 is NaN under FSDP2: every rank skips step 2 (its local shards
    checked, one all-reduce of flags) and ends where a run without batch 2 ends."""
    _init(rank, world, tmp)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = [(x[shard], y[shard]) for x, y in data("conv", world)]
    poisoned = list(local)
    if rank == 1:
        poisoned[2] = (torch.full_like(local[2][0], float("nan")), local[2][1])
    ends = []
    for batches in (poisoned, local[:2] + local[3:]):
        net, model, opt = build("conv", "tekfac", "empirical", "fsdp")
        with pytest.warns(RuntimeWarning, match="skipping this step") if batches is poisoned \
                else contextlib.nullcontext():
            run(model, opt, batches, mc=False)
        ends.append(full_parameters(net))
    assert all(torch.equal(p, q) for p, q in zip(*ends))


def test_a_bad_batch_on_one_rank_is_skipped_by_every_rank_under_fsdp2(tmp_path):
    launch(_bad_batch_on_one_rank, 2, tmp_path)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("faults", "not json", "faults cannot be read"), ("steps", None, "'steps' is not an integer")])
def test_an_unreadable_checkpoint_changes_nothing(key, value, match):
    """Every part of the curvature is read before any is installed."""
    _, opt = _trained()
    saved = copy.deepcopy(opt.state_dict())
    other_net, other = _trained("tekfac")
    run(other_net, other, data("conv", 1)[3:], mc=True)
    before = copy.deepcopy(other.state_dict())
    curvature_of(saved)[key] = value
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(saved)
    after = other.state_dict()
    assert curvature_of(after)["steps"] == curvature_of(before)["steps"] == STEPS
    for name, entry in curvature_of(before)["layers"].items():
        assert all(torch.equal(v, curvature_of(after)["layers"][name][k])
                   for k, v in entry.items())


def _preconditioner_with_torch_sgd(rank, world, tmp):
    """The Preconditioner alone under FSDP2, with torch.optim.SGD taking the step (the
    README's "any torch optimizer"): DDP's steps."""
    _init(rank, world, tmp)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = [(x[shard], y[shard]) for x, y in data("conv", world)]
    ends = []
    for wrap in ("ddp", "fsdp"):
        net = conv_net()
        model = nn.parallel.DistributedDataParallel(net) if wrap == "ddp" else net
        if wrap == "fsdp":
            fully_shard(net)
        pre = tekfac.Preconditioner(model, "tekfac", fisher="empirical", **FAST)
        sgd = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for x, y in local:
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            assert pre.step()
            sgd.step()
        ends.append(full_parameters(net))
    assert relative(ends[1], ends[0]) <= 1e-12


def test_the_preconditioner_alone_steps_a_sharded_model(tmp_path):
    launch(_preconditioner_with_torch_sgd, 2, tmp_path)
