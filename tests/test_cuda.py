"""The same code paths on a CUDA device: skipped where there is no GPU (as in CI).

Each optimizer trains a copy of one network on the CPU and on the GPU from the same start;
the parameters must agree, and every curvature tensor must live on the GPU (eigendecompositions
included: nothing is sent back to the host).
"""

from __future__ import annotations

import copy

import pytest
import torch

import tekfac
from tests.conftest import batch, tiny_net, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

FAST = dict(cov_update_freq=1, eigen_update_freq=2, scale_update_freq=1)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_cuda_training_matches_cpu(method, kind, fisher, argmax_sampler):
    # a deterministic label 'sampler', so that both devices draw the same MC labels
    net, shape = tiny_net(kind)
    twin = copy.deepcopy(net).cuda()
    # 32 examples: every factor has full rank. (A null eigenspace's basis is arbitrary, and
    # LAPACK and cuSOLVER choose differently; the corrected scaling depends on that choice.)
    batches = [batch(shape, n=32) for _ in range(4)]
    opts = [tekfac.KroneckerOptimizer(m, method, lr=0.1, momentum=0.9, fisher=fisher, **FAST)
            for m in (net, twin)]
    train(net, opts[0], batches, mc=fisher == "mc")
    train(twin, opts[1], [(x.cuda(), y.cuda()) for x, y in batches], mc=fisher == "mc")
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-6, atol=1e-9)
    assert bool(argmax_sampler) == (fisher == "mc")
    layers = opts[1].preconditioner.state_dict()["layers"]
    assert all(t.device.type == "cuda" for state in layers.values() for t in state.values())


def _fsdp2_on_one_gpu(rank, world, tmp):
    """FSDP2 over NCCL on one GPU (world 1; shards of one): the steps of the plain model."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("nccl", init_method=f"file://{tmp}/pg", rank=rank,
                            world_size=world)
    torch.cuda.set_device(rank)
    net, shape = tiny_net("cnn")
    twin = copy.deepcopy(net).cuda()
    net = net.cuda()
    for module in net:
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            fully_shard(module)
    fully_shard(net)
    batches = [(x.cuda(), y.cuda()) for x, y in (batch(shape, n=32) for _ in range(4))]
    opts = [tekfac.TEKFAC(m, fisher="empirical", **FAST) for m in (net, twin)]
    train(net, opts[0], batches, mc=False)
    train(twin, opts[1], batches, mc=False)
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.full_tensor(), q, rtol=1e-9, atol=1e-12)


def test_fsdp2_over_nccl(tmp_path):
    from tests.test_distributed import launch
    launch(_fsdp2_on_one_gpu, 1, tmp_path)
