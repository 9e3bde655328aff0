"""Write ``tests/data/checkpoint-0.1.0.pt`` with tekfac 0.1.0 (commit 7c2a4eb)::

    git worktree add /tmp/v010 7c2a4eb && cd /tmp/v010
    python /path/to/tests/data/make_checkpoint.py /tmp/v010 checkpoint-0.1.0.pt

The first argument is the checkout whose ``tekfac`` and ``tests.conftest`` are imported. Per
method: the model and optimizer state after 3 MC steps on the tiny CNN, then the parameters
after 3 more (read by ``tests/test_optim.py::test_checkpoints_of_release_0_1_0_keep_loading``).
"""

import copy
import sys

import torch

sys.path.insert(0, sys.argv[1])
import tekfac
from tests.conftest import tiny_net, train

FAST = dict(cov_update_freq=2, eigen_update_freq=3, scale_update_freq=2)
gen = torch.Generator().manual_seed(1234)
batches = [(torch.randn(32, 2, 5, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (32,), generator=gen)) for _ in range(6)]
out = {"batches": batches, "runs": {}}
for method in tekfac.METHODS:
    torch.manual_seed(0)
    net, _ = tiny_net("cnn")
    opt = tekfac.KroneckerOptimizer(net, method, lr=0.05, seed=7, **FAST)
    train(net, opt, batches[:3])
    saved = {"model": copy.deepcopy(net.state_dict()), "optim": copy.deepcopy(opt.state_dict())}
    train(net, opt, batches[3:])
    saved["expected"] = [p.detach().clone() for p in net.parameters()]
    out["runs"][method] = saved
torch.save(out, sys.argv[2])
