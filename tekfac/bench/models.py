"""Benchmark models.

Every image model is an `nn.Module` made of `nn.Linear` and `nn.Conv2d` layers (all with
groups=1), BatchNorm, ReLU and pooling, initialised by PyTorch's default initialisers; seed
torch before building for reproducible weights. Classifiers map images of shape (N, C, H, W)
to logits of shape (N, num_classes). The language model `tiny_gpt` maps int64 tokens (N, T) to
next-token logits (N, T, V) and adds `nn.Embedding`, `nn.LayerNorm`, `nn.MultiheadAttention`
and a head tied to the token embedding. `MODELS` maps each builder's name to the builder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def autoencoder() -> nn.Sequential:
    """The deep autoencoder of the K-FAC paper (Martens & Grosse 2015), with ReLU units.

    Layers 784-1000-500-250-30-250-500-1000-784, ReLU after every layer except the 30-unit code
    layer and the output. Train it with `nn.BCEWithLogitsLoss` against the flattened input pixels
    in [0, 1] (not normalised).

    Returns:
        Module mapping images (N, 1, 28, 28) (or (N, 784)) to reconstruction logits (N, 784).
    """
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i not in (3, len(sizes) - 2):  # no activation on the code layer and the output
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mlp(
    in_features: int = 64, hidden: Sequence[int] = (64,), num_classes: int = 10
) -> nn.Sequential:
    """Fully connected ReLU network, for the digits smoke task.

    Args:
        in_features: Number of input features; inputs of any shape (N, ...) are flattened.
        hidden: Widths of the hidden layers.
        num_classes: Number of output logits.

    Returns:
        Module mapping (N, ...) with `in_features` entries per example to logits (N, num_classes).
    """
    layers: list[nn.Module] = [nn.Flatten()]
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """Two 5x5 conv layers with max pooling, then two fully connected layers.

    Conv(in_channels→32, 5x5, pad 2)-ReLU-MaxPool(2)-Conv(32→64, 5x5, pad 2)-ReLU-MaxPool(2)-
    MaxPool(2)-Flatten-Linear(64·(image_size//8)²→128)-ReLU-Linear(128→num_classes).

    The third pooling keeps the first fully connected layer small (577 inputs for 28x28), so
    that its Kronecker factor is cheap to decompose.

    Args:
        in_channels: Input channels C.
        num_classes: Number of output logits.
        image_size: Height and width of the square input images.

    Returns:
        Module mapping (N, C, image_size, image_size) to logits (N, num_classes).
    """
    side = image_size // 8
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _vgg_features(config: Sequence[int | str], in_channels: int) -> list[nn.Module]:
    """VGG feature layers: an int is a 3x3 conv (pad 1, no bias) + BatchNorm + ReLU with that
    many output channels, "M" a 2x2 max pool."""
    layers: list[nn.Module] = []
    for item in config:
        if isinstance(item, int):
            layers += [
                nn.Conv2d(in_channels, item, 3, padding=1, bias=False),
                nn.BatchNorm2d(item),
                nn.ReLU(),
            ]
            in_channels = item
        else:
            layers.append(nn.MaxPool2d(2))
    return layers


def narrow_vgg(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """Small VGG-style network: conv widths [w, w, M, 2w, 2w, M, 4w, 4w, M] (3x3 conv +
    BatchNorm + ReLU, M = 2x2 max pool), global average pooling, Linear(4w→num_classes).

    Args:
        in_channels: Input channels C.
        num_classes: Number of output logits.
        width: Channels w of the first stage.

    Returns:
        Module mapping (N, C, H, W), H and W at least 8, to logits (N, num_classes).
    """
    w = width
    config = [w, w, "M", 2 * w, 2 * w, "M", 4 * w, 4 * w, "M"]
    return nn.Sequential(
        *_vgg_features(config, in_channels),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


def vgg16(num_classes: int = 10) -> nn.Sequential:
    """VGG16 with BatchNorm in its common CIFAR variant: the 13 conv layers of VGG16 (3x3 conv +
    BatchNorm + ReLU), five 2x2 max pools reducing 32x32 to 1x1, and a single
    Linear(512→num_classes) classifier in place of the three ImageNet fully connected layers.

    Args:
        num_classes: Number of output logits.

    Returns:
        Module mapping (N, 3, 32, 32) to logits (N, num_classes).
    """
    config = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M"]
    config += [512, 512, 512, "M", 512, 512, 512, "M"]
    return nn.Sequential(*_vgg_features(config, 3), nn.Flatten(), nn.Linear(512, num_classes))


class _BasicBlock(nn.Module):
    """Residual block of two 3x3 convs with BatchNorm and an option-A shortcut: the identity, or
    when the block downsamples, the input subsampled by 2 and zero-padded to the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return F.relu(out + shortcut)


def resnet32(num_classes: int = 10) -> nn.Sequential:
    """CIFAR ResNet-32 of He et al. 2016 (section 4.2), about 0.46M parameters.

    A 3x3 conv (3→16) + BatchNorm + ReLU, three stages of 5 basic blocks with 16, 32 and 64
    channels (the 2nd and 3rd stages halve the resolution in their first block), global average
    pooling and Linear(64→num_classes): 31 conv layers and 1 linear layer. Shortcuts are option A
    (identity, zero-padded when the channels grow), so they add no parameters.

    Args:
        num_classes: Number of output logits.

    Returns:
        Module mapping (N, 3, 32, 32) to logits (N, num_classes).
    """
    layers: list[nn.Module] = [
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
    ]
    in_channels = 16
    for channels, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(5):
            layers.append(_BasicBlock(in_channels, channels, stride if i == 0 else 1))
            in_channels = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


class _TransformerBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``,
    with causal multi-head self-attention and a 4x wide MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x`` (N, T, width); ``mask`` (T, T) bool, True where attention is not allowed."""
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Small causal transformer language model; see `tiny_gpt`.

    Attributes:
        tok: Token embedding (vocab_size, width), shared with ``head``.
        pos: Learned position embedding (block_size, width).
        blocks: The pre-LN transformer blocks.
        ln: Final LayerNorm.
        head: Linear(width -> vocab_size) without bias, whose weight IS ``tok.weight``.
    """

    def __init__(self, vocab_size: int, block_size: int, width: int, depth: int,
                 heads: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(_TransformerBlock(width, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying: one parameter, two uses
        # GPT-2's embedding initialisation; PyTorch's N(0, 1) would give the tied head logits
        # of standard deviation sqrt(width) at the start.
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """int64 tokens (N, T), T <= block_size -> logits (N, T, vocab_size); position t sees
        tokens 0..t only."""
        n, t = tokens.shape
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size "
                             f"{self.block_size}")
        # The positions are expanded to (N, T), not passed as a bare arange(T): the optimizer
        # takes the leading dimension of every tracked layer's input as the batch, so each
        # layer (the position embedding included) must see the N examples there.
        pos = torch.arange(t, device=tokens.device).expand(n, t)
        x = self.tok(tokens) + self.pos(pos)
        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def tiny_gpt(vocab_size: int = 98, block_size: int = 64, width: int = 64, depth: int = 2,
             heads: int = 4) -> TinyGPT:
    """A small GPT-style causal transformer for character-level language modelling.

    Token embedding plus learned position embedding, ``depth`` pre-LN blocks (LayerNorm, causal
    ``nn.MultiheadAttention`` with ``heads`` heads, residual; LayerNorm, Linear(width -> 4·width),
    GELU, Linear(4·width -> width), residual), a final LayerNorm, and a bias-free output layer
    tied to the token embedding. No dropout. Embeddings are initialised N(0, 0.02²), the other
    layers by PyTorch's defaults. The defaults are the text-gpt task's model (98 is
    ``len(tekfac.bench.data.CHARACTERS)``): about 0.11 M parameters.

    Args:
        vocab_size: Number of tokens V.
        block_size: Longest sequence T the model accepts (rows of the position embedding).
        width: Model width (embedding size); divisible by ``heads``.
        depth: Number of transformer blocks.
        heads: Attention heads per block.

    Returns:
        Module mapping int64 tokens (N, T), T <= block_size, to logits (N, T, vocab_size).
    """
    return TinyGPT(vocab_size, block_size, width, depth, heads)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "autoencoder": autoencoder,
    "mlp": mlp,
    "small_cnn": small_cnn,
    "narrow_vgg": narrow_vgg,
    "vgg16": vgg16,
    "resnet32": resnet32,
    "tiny_gpt": tiny_gpt,
}
