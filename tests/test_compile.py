"""``torch.compile``: a compiled model takes the steps of the eager one, with every method and
both Fishers, whether compiled by ``torch.compile(model)`` or ``model.compile()``; names are the
bare model's; the hooks break the graph on statistics steps only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac

EVERY_STEP = dict(lr=0.1, cov_update_freq=1, eigen_update_freq=2, damping=1e-2, seed=0)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4),
                         nn.ReLU(inplace=True), nn.Linear(4, 3)).double()


def train(model: nn.Module, opt: tekfac.KroneckerOptimizer, fisher: str, steps: int = 3
          ) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    for _ in range(steps):
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        if fisher == "mc":
            opt.backward(loss, out)
        else:
            loss.backward()
        opt.step()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_a_compiled_model_takes_the_eager_steps(method, fisher, how):
    if how == "model.compile()" and method not in ("kfac", "tekfac"):
        pytest.skip("model.compile() is checked with KFAC and TEKFAC (the same hooks)")
    eager, compiled = net(), net()
    train(eager, tekfac.KroneckerOptimizer(eager, method, fisher=fisher, **EVERY_STEP), fisher)
    if how == "model.compile()":
        compiled.compile()
        model = compiled
    else:
        model = torch.compile(compiled)
    train(model, tekfac.KroneckerOptimizer(model, method, fisher=fisher, **EVERY_STEP), fisher)
    torch.testing.assert_close(flat(compiled), flat(eager), rtol=1e-10, atol=1e-12)


def test_a_compiled_model_has_the_bare_models_names():
    model = net()
    opt = tekfac.KFAC(torch.compile(model), exclude=["5"])
    assert [la.name for la in opt.preconditioner.layers] == ["0", "3"]
    assert "_orig_mod" not in opt.describe()


def test_graph_breaks_come_from_statistics_steps_only():
    """A forward that records nothing compiles to the graph of the model without an optimizer
    (every call captured, no break): the hooks' bookkeeping is traced. A recording forward
    breaks the graph at the tracked layers, whose recording runs eagerly."""
    from torch._dynamo.utils import counters

    x = torch.randn(8, 1, 6, 6, dtype=torch.float64)

    def compiled_forward(recording: bool | None) -> tuple[int, int, int]:
        """Graph breaks, graphs and calls captured when compiling one forward."""
        torch._dynamo.reset()
        counters.clear()
        model = net()
        if recording is not None:
            tekfac.KFAC(model).preconditioner.capture.recording = recording
        torch.compile(model)(x)
        stats = counters["stats"]
        return (sum(counters["graph_break"].values()), stats["unique_graphs"],
                stats["calls_captured"])

    whole = compiled_forward(None)
    assert whole[:2] == (0, 1)
    assert compiled_forward(False) == whole
    breaks, graphs, _ = compiled_forward(True)
    assert breaks > 0 and graphs > 1
