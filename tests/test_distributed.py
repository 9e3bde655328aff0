"""Data-parallel training with gloo on CPU: equality with the single-process reference on the
concatenated batch, the eigendecomposition work split, resume, and failing fast."""

from __future__ import annotations

import copy
import datetime
import gc
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import tekfac
import tekfac.fisher
from tests.conftest import counting_argmax_labels, curvature_of, set_fields, tiny_net, train

FAST = dict(cov_update_freq=2, eigen_update_freq=3, scale_update_freq=2)
STEPS = 5
PER_RANK = 12  # ≥ 19 examples in all: full-rank factors, so the eigenbases are unique
TIMEOUT_S = 120


def launch(fn, world: int, tmp_path: Path, *args) -> None:
    """Run ``fn(rank, world, tmp_path, *args)`` in ``world`` spawned processes; fail on an
    error in any of them or when they are not all done within TIMEOUT_S."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, rank, world, str(tmp_path), *args))
             for rank in range(world)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    errors = [(tmp_path / f"error{r}.txt").read_text() for r in range(world)
              if (tmp_path / f"error{r}.txt").exists()]
    assert not errors, "\n".join(errors)
    assert not alive, f"ranks still running after {TIMEOUT_S}s: hung"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _entry(fn, rank, world, tmp, *args):
    torch.set_num_threads(1)
    try:
        fn(rank, world, Path(tmp), *args)
    except BaseException:
        (Path(tmp) / f"error{rank}.txt").write_text(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():  # free DDP and the optimizers (hook cycles) while the
            gc.collect()  # group is alive: gloo work freed at interpreter exit can abort
            dist.destroy_process_group()


def _init(rank, world, tmp, timeout_s=30):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def _data(world, steps=STEPS):
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(world * PER_RANK, 2, 5, 5, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (world * PER_RANK,), generator=gen)) for _ in range(steps)]


def _equal_to_reference(rank, world, tmp, fisher, options=None):
    options = {**FAST, **(options or {})}
    mc = fisher == "mc"
    sampled: list = []
    if mc:
        assert hasattr(tekfac.fisher, "sample_targets")
        tekfac.fisher.sample_targets = counting_argmax_labels(sampled)
    data = _data(world)
    references = {}
    for method in tekfac.METHODS:  # single process on the concatenated batches, no group yet
        torch.manual_seed(0)
        net, _ = tiny_net("cnn")
        opt = tekfac.KroneckerOptimizer(net, method, fisher=fisher, **options)
        train(net, opt, data, mc=mc)
        references[method] = (net, opt)
    _init(rank, world, tmp)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for method, (ref_net, ref_opt) in references.items():
        torch.manual_seed(0)
        net, _ = tiny_net("cnn")
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = tekfac.KroneckerOptimizer(ddp, method, fisher=fisher, **options)
        train(ddp, opt, [(x[shard], y[shard]) for x, y in data], mc=mc)
        # Kronecker scalings depend on the factors only; corrected ones also on the basis,
        # which roundoff (another summation order) rotates by ~ε/gap, hence the looser
        # tolerance. (With rank-deficient factors the basis of the null space is arbitrary
        # and corrected scalings legitimately differ.)
        tol = 1e-10 if method in ("kfac", "tkfac") else 1e-6
        for module, ref_module in zip(net.modules(), ref_net.modules()):
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                dense, ref = opt.curvature(module).dense(), ref_opt.curvature(ref_module).dense()
                assert (dense - ref).norm() <= tol * ref.norm(), (method, module)
        for p, q in zip(net.parameters(), ref_net.parameters()):
            assert (p - q).norm() <= tol * q.norm(), (method, p.shape)
        # the work split: 3 layers × 2 factors at each of 2 refreshes (steps 0 and 3)
        counts = [torch.zeros((), dtype=torch.long) for _ in range(world)]
        dist.all_gather(counts, torch.tensor(opt.preconditioner.estimates.eigendecompositions))
        counts = [int(c) for c in counts]
        assert sum(counts) == 12 and max(counts) < 12, counts
        assert ref_opt.preconditioner.estimates.eigendecompositions == 12
        assert opt.preconditioner.comm.bytes_sent > 0
        assert opt.preconditioner.comm.wait_s > 0  # the statistics reductions were awaited
    assert bool(sampled) == mc  # the sampler's patch applied
    if mc:
        _reduction_overlaps_the_backward(data[0][0][shard], data[0][1][shard])


def _reduction_overlaps_the_backward(x, y):
    """On an MC statistics step the statistics all-reduce is launched before loss.backward()
    reaches the model output: the bytes sent by then exceed those at the sampled pass."""
    net, _ = tiny_net("cnn")
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = tekfac.TEKFAC(ddp, **FAST)
    comm = opt.preconditioner.comm
    for step in range(3):  # statistics steps 0 and 2; at 2 the corrected scaling goes early too
        out = ddp(x)
        sent = []
        out.register_hook(lambda grad, sent=sent: sent.append(comm.bytes_sent))
        opt.zero_grad()
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()
        if step % 2 == 0:  # [at the sampled backward, at loss.backward()]
            assert len(sent) == 2 and sent[1] > sent[0], (step, sent)
        else:
            assert len(sent) == 1


def _owner_mode(rank, world, tmp, max_factor_dim, basis_rank=None):
    options = dict(FAST, max_factor_dim=max_factor_dim, basis_rank=basis_rank)
    data = _data(world)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    references = {}
    for method in tekfac.METHODS:
        torch.manual_seed(0)
        net, _ = tiny_net("cnn")
        opt = tekfac.KroneckerOptimizer(net, method, fisher="empirical", **options)
        train(net, opt, data, mc=False)
        references[method] = net
    _init(rank, world, tmp)
    def build(method):
        torch.manual_seed(0)
        net, _ = tiny_net("cnn")
        ddp = nn.parallel.DistributedDataParallel(net)
        return net, ddp, tekfac.KroneckerOptimizer(ddp, method, fisher="empirical",
                                                   distributed_mode="owner", **options)

    for method, ref_net in references.items():
        net, ddp, opt = build(method)
        train(ddp, opt, [(x[shard], y[shard]) for x, y in data[:3]], mc=False)
        saved = (copy.deepcopy(net.state_dict()),
                 copy.deepcopy(opt.state_dict()))  # a collective in owner mode
        train(ddp, opt, [(x[shard], y[shard]) for x, y in data[3:]], mc=False)
        for p, q in zip(net.parameters(), ref_net.parameters()):
            assert (p - q).norm() <= 1e-10 * q.norm(), method
        pre = opt.preconditioner
        mine = [la for la in pre.layers if pre.work.owners[la] == rank]
        assert all(la.diagonal_in == (max_factor_dim is not None) for la in pre.layers)
        assert all(pre.states[la].basis_out is not None for la in mine)
        assert all(pre.states[la].basis_out is None and pre.states[la].factor_in is None
                   for la in pre.layers if la not in mine)  # nothing of the others' layers
        others = [la for la in pre.layers if la not in mine]
        if others:
            with pytest.raises(RuntimeError, match="held by rank"):
                opt.curvature(others[0].module)
        assert all("basis_out" in set_fields(entry)  # gathered from the owners
                   for entry in curvature_of(saved[1])["layers"].values())
        # resume from the gathered state: the same parameters as without the interruption
        net2, ddp2, opt2 = build(method)
        net2.load_state_dict(saved[0])
        opt2.load_state_dict(saved[1])
        train(ddp2, opt2, [(x[shard], y[shard]) for x, y in data[3:]], mc=False)
        for p, q in zip(net.parameters(), net2.parameters()):
            assert torch.equal(p, q), method


@pytest.mark.parametrize(("max_factor_dim", "basis_rank"),
                         [(None, None), (10, None), (None, 3)])  # 10: every input side diagonal
def test_owner_mode_equals_the_reference_and_keeps_curvature_on_owners(tmp_path,
                                                                       max_factor_dim, basis_rank):
    """Every method: factors, bases and scalings only on their owners (EKFAC/TEKFAC's bases
    broadcast on re-fit steps), the same steps as one process, and a gathered resume."""
    launch(_owner_mode, 2, tmp_path, max_factor_dim, basis_rank)


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_equals_the_single_process_reference(world, tmp_path):
    launch(_equal_to_reference, world, tmp_path, "empirical")


def test_truncated_bases_are_shared_and_equal_the_reference(tmp_path):
    """basis_rank=3: the decompositions' shared results have the truncated shapes."""
    launch(_equal_to_reference, 2, tmp_path, "empirical", {"basis_rank": 3})


def test_mc_statistics_are_reduced_during_the_backward_and_equal_the_reference(tmp_path):
    launch(_equal_to_reference, 2, tmp_path, "mc")


def _resume(rank, world, tmp):
    _init(rank, world, tmp)
    data = _data(world, steps=8)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    batches = [(x[shard], y[shard]) for x, y in data]

    def build():
        torch.manual_seed(0)
        net, _ = tiny_net("cnn")
        ddp = nn.parallel.DistributedDataParallel(net)
        return net, ddp, tekfac.TEKFAC(ddp, **FAST)

    net, ddp, opt = build()
    train(ddp, opt, batches[:3], mc=True)
    if rank == 0:
        torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp / "ckpt.pt")
    dist.barrier()
    train(ddp, opt, batches[3:], mc=True)
    net2, ddp2, opt2 = build()
    ckpt = torch.load(tmp / "ckpt.pt", weights_only=True)
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(ddp2, opt2, batches[3:], mc=True)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    # ranks agree with each other (MC labels differ per rank, the statistics are shared)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, gathered[0]) for g in gathered)


def _one_rank_sees_a_bad_batch(rank, world, tmp):
    """Rank 1's part of batch 2 is NaN: every rank skips step 2 (none hangs) and ends exactly
    where a run without batch 2 ends."""
    _init(rank, world, tmp)
    data = _data(world, steps=4)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    runs = []
    for poisoned in (False, True):
        torch.manual_seed(0)
        net, _ = tiny_net("cnn")
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = tekfac.TEKFAC(ddp, seed=0, **FAST)
        for i, (x, y) in enumerate(data):
            if i == 2 and not poisoned:
                continue
            x = x[shard].clone()
            if i == 2 and rank == 1:
                x[:] = float("nan")
            out = ddp(x)
            opt.zero_grad()
            opt.backward(F.cross_entropy(out, y[shard]), out)
            opt.step()
        runs.append((net, opt))
    (clean, clean_opt), (net, opt) = runs
    assert opt.preconditioner.steps == clean_opt.preconditioner.steps == 3
    for p, q in zip(net.parameters(), clean.parameters()):
        assert torch.equal(p, q)


def test_a_bad_batch_on_one_rank_is_skipped_by_every_rank(tmp_path):
    launch(_one_rank_sees_a_bad_batch, 2, tmp_path)


def test_state_saved_on_rank0_resumes_identically_on_all_ranks(tmp_path):
    launch(_resume, 2, tmp_path)


def _one_rank_fails(rank, world, tmp):
    _init(rank, world, tmp, timeout_s=20)
    torch.manual_seed(0)
    net, _ = tiny_net("mlp")
    opt = tekfac.KFAC(net, fisher="empirical")
    if rank == 1:
        os._exit(3)  # a crash: no clean shutdown of the process group
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    F.cross_entropy(net(x), y).backward()
    try:
        opt.step()
    except RuntimeError as e:
        (tmp / "rank0.txt").write_text(str(e))
        return
    raise AssertionError("rank 0 finished a step although rank 1 had crashed")


def test_a_crashed_rank_makes_the_others_fail_fast(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(_one_rank_fails, r, 2, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(TIMEOUT_S)
    hung = procs[0].is_alive()
    for p in procs:
        p.kill()
        p.join()
    assert not hung, "rank 0 hung after rank 1 crashed"
    message = (tmp_path / "rank0.txt").read_text()
    assert "another rank probably crashed" in message


def _ddp_wrapped(rank, world, tmp):
    _init(rank, world, tmp)
    net, shape = tiny_net("mlp")
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = tekfac.KFAC(ddp, fisher="empirical")
    x = torch.randn(8, *shape, dtype=torch.float64)
    F.cross_entropy(ddp(x), torch.randint(0, 3, (8,))).backward()
    opt.step()
    assert [la.name for la in opt.preconditioner.layers] == ["0", "2"]
    assert opt.curvature(net[0]).dense().shape == (24, 24)


def test_ddp_wrapped_model_is_unwrapped(tmp_path):
    """In a spawned process: gloo in the pytest process itself hung intermittently here."""
    launch(_ddp_wrapped, 1, tmp_path)


def test_communicator_is_a_no_op_without_a_group():
    comm = tekfac.distributed.Communicator()
    t = [torch.ones(2)]
    assert comm.weighted_mean_async([(t, 3.0)]).wait() == [(t, 3.0)]
    assert comm.assign([8.0, 1.0, 27.0]) == [0, 0, 0]


def test_greedy_split_is_largest_first():
    comm = tekfac.distributed.Communicator()
    comm.size = 2  # only the assignment is exercised
    # costs 27, 8, 8, 1: 27 → r0; 8 → r1; 8 → r1 (load 8 < 27); 1 → r1 (16 < 27)
    assert comm.assign([8.0, 27.0, 1.0, 8.0]) == [1, 0, 1, 1]


def _adaptive_damping(rank, world, tmp, mode):
    """Adaptive damping on shards equals the single process on the whole batch: the same
    ratios, dampings and parameters (each rank's loss change averaged; in owner mode each
    rank adds its layers' quadratic forms)."""
    from tekfac.damping_adaptation import DampingAdaptation

    options = dict(FAST, fisher="empirical", kl_clip=None, damping=1e-2,
                   damping_adaptive=DampingAdaptation(interval=1, decay=0.5))
    data = _data(world)

    def run(model, opt, batches):
        ratios = []
        for x, y in batches:
            def closure(x=x, y=y):
                opt.zero_grad()
                out = model(x)
                loss = F.cross_entropy(out, y)
                opt.backward(loss, out)
                return loss
            opt.step(closure)
            ratios.append((opt.reduction_ratio, opt.damping))
        return ratios

    torch.manual_seed(0)
    ref_net, _ = tiny_net("cnn")
    ref_opt = tekfac.KroneckerOptimizer(ref_net, "kfac", **options)
    expected = run(ref_net, ref_opt, data)
    _init(rank, world, tmp)
    torch.manual_seed(0)
    net, _ = tiny_net("cnn")
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = tekfac.KroneckerOptimizer(ddp, "kfac", distributed_mode=mode, **options)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    got = run(ddp, opt, [(x[shard], y[shard]) for x, y in data])
    assert [d for _, d in got] == pytest.approx([d for _, d in expected], rel=1e-9)
    assert [r for r, _ in got] == pytest.approx([r for r, _ in expected], rel=1e-6)
    assert len({d for _, d in got}) > 1  # the damping moved
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert (p - q).norm() <= 1e-10 * q.norm()


@pytest.mark.parametrize("mode", ["replicated", "owner"])
def test_adaptive_damping_on_shards_equals_the_single_process(tmp_path, mode):
    launch(_adaptive_damping, 2, tmp_path, mode)


def _quadratic_rule(rank, world, tmp, method, mode, damping_type):
    """The quadratic step rule on shards equals the single process on the whole batch: each
    rank's exact curvature products are averaged into one 2 × 2 system (in owner mode each rank
    adds the damping of its layers)."""
    options = dict(FAST, fisher="empirical", damping=1e-2, damping_type=damping_type,
                   step_rule="quadratic", weight_decay=1e-3)
    data = _data(world)

    def run(model, opt, batches):
        coefficients = []
        for x, y in batches:
            opt.zero_grad()
            out = model(x)
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()
            coefficients.append(opt.step_coefficients)
        return coefficients

    torch.manual_seed(0)
    ref_net, _ = tiny_net("cnn")
    expected = run(ref_net, tekfac.KroneckerOptimizer(ref_net, method, **options), data)
    _init(rank, world, tmp)
    torch.manual_seed(0)
    net, _ = tiny_net("cnn")
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = tekfac.KroneckerOptimizer(ddp, method, distributed_mode=mode, **options)
    shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    got = run(ddp, opt, [(x[shard], y[shard]) for x, y in data])
    tol = 1e-9 if method == "kfac" else 1e-6  # corrected scalings: see _equal_to_reference
    for (a, m), (ra, rm) in zip(got, expected):
        assert a == pytest.approx(ra, rel=tol) and m == pytest.approx(rm, rel=tol, abs=tol)
    assert got[-1][1] != 0.0  # the momentum was chosen
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert (p - q).norm() <= tol * q.norm()


@pytest.mark.parametrize("method, mode, damping_type", [
    ("tekfac", "replicated", "eigenvalue"), ("kfac", "owner", "trace_relative")])
def test_quadratic_rule_on_shards_equals_the_single_process(tmp_path, method, mode,
                                                            damping_type):
    launch(_quadratic_rule, 2, tmp_path, method, mode, damping_type)
