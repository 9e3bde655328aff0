"""Lightning with tekfac: :class:`TekfacBackward`, a ``LightningModule`` mixin.

Lightning's automatic optimisation runs ``training_step``, then the module's ``backward``
hook, inside the closure it passes to ``optimizer.step`` (which tekfac's step calls first,
as ``torch.optim``'s do). The mixin's ``backward`` is tekfac's
``optimizer.backward(loss, outputs, mask=mask)``, with the outputs that ``training_step``
names by :meth:`TekfacBackward.tekfac_outputs`; so both Fishers and the quadratic step rule
work, with automatic and with manual optimisation (``self.manual_backward(loss)``).
Lightning divides the loss by ``accumulate_grad_batches`` before the hook, as tekfac's
gradient accumulation expects. With ``precision="16-mixed"`` give the optimizer
``grad_scaler=trainer.precision_plugin.scaler`` (built in ``configure_optimizers``).

Example::

    class Classifier(TekfacBackward, lightning.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.net(x)
            self.tekfac_outputs(logits)
            return F.cross_entropy(logits, y)

        def configure_optimizers(self):
            return tekfac.TEKFAC(self.net, lr=1e-2)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tekfac.integrations import unwrap_optimizer

__all__ = ["TekfacBackward"]


class TekfacBackward:
    """Mixin (list it before ``LightningModule``) whose ``backward`` hook is tekfac's."""

    _tekfac_loss_outputs: tuple[Tensor, Tensor | None] | None = None

    def tekfac_outputs(self, outputs: Tensor, mask: Tensor | None = None) -> None:
        """Name the tensor this training step's loss is computed from (logits for the
        classification losses), and the mask of its terms that enter the loss (see
        :meth:`tekfac.KroneckerOptimizer.backward`)."""
        self._tekfac_loss_outputs = (outputs, mask)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """``optimizer.backward(loss, outputs, mask=mask)`` with the outputs of
        :meth:`tekfac_outputs`; Lightning's ``loss.backward()`` arguments are refused."""
        if args or kwargs:
            raise TypeError("tekfac's backward takes no loss.backward() arguments")
        if self._tekfac_loss_outputs is None:
            raise RuntimeError("TekfacBackward: call self.tekfac_outputs(outputs) in "
                               "training_step with the tensor the loss is computed from")
        outputs, mask = self._tekfac_loss_outputs
        self._tekfac_loss_outputs = None
        optimizers = self.optimizers(use_pl_optimizer=False)  # type: ignore[attr-defined]
        if isinstance(optimizers, list):
            if len(optimizers) != 1:
                raise ValueError("TekfacBackward supports one optimizer, the tekfac one; got "
                                 f"{len(optimizers)}")
            optimizers = optimizers[0]
        optimizer = unwrap_optimizer(optimizers)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # type: ignore[attr-defined]
        if scaler is not None and optimizer.preconditioner.fisher.grad_scaler is not scaler:
            raise ValueError("Lightning scales the loss with a GradScaler that the optimizer "
                             "does not know: build it with "
                             "grad_scaler=self.trainer.precision_plugin.scaler")
        optimizer.backward(loss, outputs, mask=mask)
