"""Tests of tekfac.bench.models: shapes, layer counts and parameter counts."""

import pytest
import torch
from torch import nn

from tekfac.bench.models import (
    MODELS,
    autoencoder,
    mlp,
    narrow_vgg,
    resnet32,
    small_cnn,
    tiny_gpt,
    vgg16,
)


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("build", "input_shape", "output_shape"),
    [
        (autoencoder, (2, 1, 28, 28), (2, 784)),
        (lambda: mlp(), (2, 1, 8, 8), (2, 10)),
        (lambda: mlp(12, (7, 5), 3), (2, 12), (2, 3)),
        (lambda: small_cnn(), (2, 1, 28, 28), (2, 10)),
        (lambda: small_cnn(3, 100, image_size=32), (2, 3, 32, 32), (2, 100)),
        (lambda: narrow_vgg(), (2, 1, 28, 28), (2, 10)),
        (lambda: narrow_vgg(3, 100, width=8), (2, 3, 32, 32), (2, 100)),
        (lambda: vgg16(100), (2, 3, 32, 32), (2, 100)),
        (lambda: resnet32(10), (2, 3, 32, 32), (2, 10)),
    ],
)
def test_output_shape(build, input_shape, output_shape):
    assert build()(torch.rand(input_shape)).shape == output_shape


def test_registry_lists_every_builder():
    expected = {
        "autoencoder": autoencoder,
        "mlp": mlp,
        "small_cnn": small_cnn,
        "narrow_vgg": narrow_vgg,
        "vgg16": vgg16,
        "resnet32": resnet32,
        "tiny_gpt": tiny_gpt,
    }
    assert expected == MODELS


@pytest.mark.parametrize("name", sorted(MODELS))
def test_only_supported_layers_and_ungrouped_convs(name):
    model = MODELS[name]()
    assert all(m.groups == 1 for m in model.modules() if isinstance(m, nn.Conv2d))
    with_params = {type(m) for m in model.modules() if list(m.parameters(recurse=False))}
    allowed = {nn.Linear, nn.Conv2d, nn.BatchNorm2d}
    if name == "tiny_gpt":  # and the attention's output projection, a Linear subclass
        allowed |= {nn.Embedding, nn.LayerNorm, nn.MultiheadAttention,
                    nn.modules.linear.NonDynamicallyQuantizableLinear}
    assert with_params <= allowed


@pytest.mark.parametrize("name", ["autoencoder", "mlp", "small_cnn", "narrow_vgg", "tiny_gpt"])
def test_init_is_deterministic_given_the_seed(name):
    torch.manual_seed(0)
    first = MODELS[name]().state_dict()
    torch.manual_seed(0)
    second = MODELS[name]().state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_autoencoder_layers_and_parameter_count():
    model = autoencoder()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 1000),
        (1000, 500),
        (500, 250),
        (250, 30),
        (30, 250),
        (250, 500),
        (500, 1000),
        (1000, 784),
    ]
    # sum of fan_in * fan_out + fan_out over the eight layers
    assert num_params(model) == 2_837_314
    # ReLU after every layer but the 30-unit code layer and the output
    kinds = [type(m) for m in model]
    assert kinds.count(nn.ReLU) == 6
    code = next(i for i, m in enumerate(model) if getattr(m, "out_features", 0) == 30)
    assert isinstance(model[code + 1], nn.Linear)
    assert isinstance(model[-1], nn.Linear)


def test_small_cnn_parameter_count():
    # conv 1*32*25+32, conv 32*64*25+64, fc 64*7*7*256+256, fc 256*10+10
    assert num_params(small_cnn()) == 832 + 51_264 + 73_856 + 1_290


def test_narrow_vgg_layers():
    model = narrow_vgg(width=16)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [16, 16, 32, 32, 64, 64]
    assert all(m.kernel_size == (3, 3) for m in convs)
    assert count(model, nn.BatchNorm2d) == 6 and count(model, nn.MaxPool2d) == 3
    assert count(model, nn.Linear) == 1


def test_vgg16_layers():
    model = vgg16(10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and count(model, nn.BatchNorm2d) == 13
    assert [m.out_channels for m in convs] == [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 10)]


def test_resnet32_layers_and_parameter_count():
    model = resnet32(10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31 and count(model, nn.Linear) == 1
    assert all(m.kernel_size == (3, 3) for m in convs)  # option A: no 1x1 shortcut convs
    assert [m.out_channels for m in convs] == [16] * 11 + [32] * 10 + [64] * 10
    # convs 3*16*9 + 10*16*16*9 + 16*32*9 + 9*32*32*9 + 32*64*9 + 9*64*64*9,
    # 31 BatchNorms 2*(16*11 + 32*10 + 64*10), linear 64*10+10
    assert num_params(model) == 461_232 + 2_272 + 650
    assert round(num_params(model) / 1e6, 2) == 0.46


def test_resnet32_downsampling_block_keeps_the_input_in_its_shortcut():
    block = resnet32()[8]  # first block of the second stage: 16 -> 32 channels, stride 2
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.zeros_(m.weight)
    x = torch.rand(2, 16, 8, 8)
    out = block(x)  # residual branch is zero, so out = relu(shortcut)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.equal(out[:, 16:], torch.zeros(2, 16, 4, 4))
