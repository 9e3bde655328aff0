"""Small helpers that route the training stacks' backward through tekfac (README, "Use with").

The MC Fisher (the default) needs ``optimizer.backward(loss, outputs)`` in place of
``loss.backward()``, and the quadratic step rule needs the graph of ``outputs``; the stacks
below call the backward themselves. Each module adapts one stack and imports it only when
used, so tekfac depends on none of them:

* :mod:`tekfac.integrations.huggingface`: the outputs and masks of Hugging Face models'
  losses (shifted, ``-100`` ignored), and a ``Trainer`` that routes its backward;
* :mod:`tekfac.integrations.lightning`: a ``LightningModule`` mixin whose ``backward`` is
  tekfac's, under Lightning's automatic optimisation;
* :mod:`tekfac.integrations.accelerate`: ``accelerator.backward`` for tekfac.
"""

from __future__ import annotations

from torch.optim import Optimizer

from tekfac.optim import KroneckerOptimizer


def unwrap_optimizer(optimizer: Optimizer) -> KroneckerOptimizer:
    """The tekfac optimizer inside the wrappers the stacks put around it (accelerate's and
    Lightning's ``optimizer`` attribute); a clear ``TypeError`` for any other optimizer."""
    inner = optimizer
    for _ in range(8):
        if isinstance(inner, KroneckerOptimizer):
            return inner
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            break
    raise TypeError(f"Expected a tekfac optimizer (KFAC, EKFAC, TKFAC, TEKFAC), possibly "
                    f"wrapped by the training stack; got {type(optimizer).__name__}")
