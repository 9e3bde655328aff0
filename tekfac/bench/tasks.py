"""Benchmark tasks: a model, a data set, a loss and a test metric (issue: benchmark suite).

Every task is trained with a batch-mean loss. Classifiers use cross-entropy and report test
accuracy (higher is better); the autoencoder uses BCE-with-logits against its input pixels and
reports the test reconstruction error ``mean_i Σ_pixels (sigmoid(logit) - x)^2`` (lower is
better), the K-FAC papers' squared error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tekfac.bench import models
from tekfac.bench.data import augment_cifar, normalize


@dataclass(frozen=True)
class Task:
    """One benchmark problem.

    Attributes:
        name: task name used on the command line.
        dataset: data set name for :func:`tekfac.bench.data.load_dataset`.
        build: model builder (call after seeding torch).
        loss: ``"cross_entropy"`` or ``"bce_with_logits"`` (the autoencoder).
        metric: name of the test metric.
        higher_is_better: direction of the metric.
        target: the metric value whose first crossing defines time-to-target.
        augment: apply the standard CIFAR augmentation to training batches.
        weight_decay: L2 coefficient, the same for every optimizer.
    """

    name: str
    dataset: str
    build: Callable[[], nn.Module]
    loss: str
    metric: str
    higher_is_better: bool
    target: float
    augment: bool = False
    weight_decay: float = 5e-4

    @property
    def is_autoencoder(self) -> bool:
        return self.loss == "bce_with_logits"

    def inputs(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Model inputs for images ``x`` in [0, 1]: augmented (training, if the task does so)
        and normalised for classifiers; raw pixels for the autoencoder."""
        if self.is_autoencoder:
            return x
        if self.augment and generator is not None:
            x = augment_cifar(x, generator)
        return normalize(x, self.dataset)

    def targets(self, x: Tensor, y: Tensor) -> Tensor:
        """Training targets: labels, or the flattened pixels for the autoencoder."""
        return x.flatten(1) if self.is_autoencoder else y

    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Batch-mean training loss."""
        if self.is_autoencoder:
            return nn.functional.binary_cross_entropy_with_logits(outputs, targets)
        return nn.functional.cross_entropy(outputs, targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
        """The test metric of ``model`` on images ``x`` with labels ``y`` (eval mode)."""
        was_training = model.training
        model.eval()
        total = 0.0
        device = next(model.parameters()).device
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device)
            out = model(self.inputs(xb))
            if self.is_autoencoder:
                total += (torch.sigmoid(out) - xb.flatten(1)).square().sum().item()
            else:
                yb = y[start:start + batch_size].to(device)
                total += (out.argmax(dim=1) == yb).sum().item()
        model.train(was_training)
        return total / len(x)


def _cifar(name: str, dataset: str, build: Callable[[], nn.Module], target: float) -> Task:
    return Task(name, dataset, build, "cross_entropy", "test_accuracy", True, target,
                augment=True)


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("fmnist-autoencoder", "fashion-mnist", models.autoencoder, "bce_with_logits",
             "test_reconstruction_error", False, target=14.0, weight_decay=0.0),
        Task("fmnist-cnn", "fashion-mnist", models.small_cnn, "cross_entropy",
             "test_accuracy", True, target=0.90),
        Task("fmnist-vgg", "fashion-mnist", models.narrow_vgg, "cross_entropy",
             "test_accuracy", True, target=0.90),
        _cifar("cifar10-vgg16", "cifar10", lambda: models.vgg16(10), 0.90),
        _cifar("cifar10-resnet32", "cifar10", lambda: models.resnet32(10), 0.90),
        _cifar("cifar100-vgg16", "cifar100", lambda: models.vgg16(100), 0.65),
        _cifar("cifar100-resnet32", "cifar100", lambda: models.resnet32(100), 0.65),
        Task("digits-mlp", "digits", lambda: models.mlp(64, (64,), 10), "cross_entropy",
             "test_accuracy", True, target=0.95),
    ]
}
