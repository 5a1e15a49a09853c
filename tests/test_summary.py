"""saq.summary / model_size_bits / bops against numbers computed by hand."""
import math

import pytest
import torch
from torch import nn

import torchsaq as saq


def tiny():
    # input (B, 3, 8, 8)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),                         # "0": out 4x8x8
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False),  # "2": out 6x4x4
        nn.ReLU(),
        nn.Conv2d(6, 6, 1),                                    # "4": out 6x4x4
        nn.BatchNorm2d(6),                                     # "5"
        nn.Flatten(),
        nn.Linear(96, 10),                                     # "7"
    )


# MACs per sample = output elements per sample x (in_channels / groups) x kernel elements
MACS = {"0": 4 * 8 * 8 * 3 * 9,      # 6912
        "2": 6 * 4 * 4 * 2 * 9,      # 1728
        "4": 6 * 4 * 4 * 6 * 1,      # 576
        "7": 10 * 96}                # 960
WEIGHTS = {"0": 4 * 3 * 9, "2": 6 * 2 * 9, "4": 6 * 6, "7": 10 * 96}   # 108, 108, 36, 960
BIASES = {"0": 4, "2": 0, "4": 6, "7": 10}
BN_AFFINE = 2 * 6


def converted(per_channel=True):
    cfg = saq.QuantConfig(w_bits=4, a_bits=3, first_last_bits=8, per_channel=per_channel,
                          layer_bits={"4": 32})  # layer "4" stays float: counts as 32 x 32
    model = saq.quantize(tiny(), cfg)
    saq.calibrate(model, [torch.randn(2, 3, 8, 8)])
    return model


def test_bops_by_hand():
    model = converted()
    bits = {"0": (8, 8), "2": (4, 3), "4": (32, 32), "7": (8, 8)}
    expected = 6912 * 8 * 8 + 1728 * 4 * 3 + 576 * 32 * 32 + 960 * 8 * 8
    assert expected == 1_114_368
    assert saq.bops(model) == expected
    s = saq.summary(model)
    assert s.bops == expected and s.macs == 6912 + 1728 + 576 + 960
    assert {r.name: r.macs for r in s.rows} == MACS
    assert {r.name: (r.w_bits, r.a_bits) for r in s.rows} == bits


@pytest.mark.parametrize("per_channel,steps", [(True, (4 + 1) + (6 + 1) + (10 + 1)), (False, 2 + 2 + 2)])
def test_size_by_hand(per_channel, steps):
    model = converted(per_channel)
    # weights at their bits ("4" at 32), biases + BN affine at 32, steps of the enabled quantizers at 32
    weights = 108 * 8 + 108 * 4 + 36 * 32 + 960 * 8
    other = (4 + 0 + 6 + 10 + BN_AFFINE) * 32
    expected = weights + other + steps * 32
    assert saq.model_size_bits(model) == expected
    s = saq.summary(model)
    assert s.size_bits == expected
    float_bits = (sum(WEIGHTS.values()) + sum(BIASES.values()) + BN_AFFINE) * 32
    assert s.float_bits == float_bits == 1244 * 32
    assert s.compression == pytest.approx(float_bits / expected)
    rows = {r.name: r for r in s.rows}
    assert {n: r.params for n, r in rows.items()} == {n: WEIGHTS[n] + BIASES[n] for n in WEIGHTS}
    assert rows["2"].per_channel is per_channel


def test_step_stats_and_table():
    model = converted()
    s = saq.summary(model)
    rows = {r.name: r for r in s.rows}
    w = model[2].weight_quantizer.step.detach()
    assert rows["2"].w_step_min == pytest.approx(w.min().item())
    assert rows["2"].w_step_max == pytest.approx(w.max().item())
    assert rows["2"].w_step_mean == pytest.approx(w.double().mean().item())
    assert rows["2"].a_step == pytest.approx(model[2].act_quantizer.step.item())
    assert rows["2"].a_signed is False and rows["0"].a_signed is True  # after ReLU vs raw input
    assert rows["4"].w_step_mean is None and rows["4"].a_step is None  # float layer: no steps
    assert rows["0"].role == "first" and rows["7"].role == "last"
    text = str(s)
    lines = text.splitlines()
    assert len({len(line) for line in lines[:2 + len(rows)]}) == 1  # fixed-width header and rows
    assert "1,114,368 BOPs" in text and "compression" in text


def test_linear_on_tokens_and_conv1d_and_reuse():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3)   # (B, 2, 10) -> (B, 4, 8)
            self.proj = nn.Linear(8, 5)      # on (B, 4, 8) tokens -> (B, 4, 5), applied twice
            self.out = nn.Linear(5, 5)

        def forward(self, x):
            h = self.proj(self.conv(x))
            return self.out(h + self.proj(self.conv(x)))

    model = saq.quantize(Tokens(), saq.QuantConfig(w_bits=2, a_bits=2, first_last_bits=8))
    with pytest.raises(ValueError, match="MACs unknown"):
        saq.bops(model)
    s = saq.summary(model)
    assert s.bops is None and "unknown" in str(s)
    s = saq.summary(model, example_inputs=torch.randn(3, 2, 10))
    conv = 2 * (4 * 8 * 2 * 3)   # called twice: 192 each
    proj = 2 * (4 * 5 * 8)       # 4 tokens x 5 outputs x 8 inputs, called twice: 160 each
    out = 4 * 5 * 5              # 100
    assert {r.name: r.macs for r in s.rows} == {"conv": conv, "proj": proj, "out": out}
    assert s.bops == conv * 8 * 8 + proj * 2 * 2 + out * 8 * 8
    # an unbatched conv input (C, L) is one sample
    model2 = saq.quantize(nn.Sequential(nn.Conv1d(2, 4, 3), nn.Conv1d(4, 4, 1)))
    assert saq.summary(model2, example_inputs=torch.randn(2, 10)).macs == 4 * 8 * 2 * 3 + 4 * 8 * 4


def test_summary_requires_quantized_model():
    with pytest.raises(ValueError, match="quantize"):
        saq.summary(tiny())
    with pytest.raises(ValueError, match="quantize"):
        saq.model_size_bits(tiny())


def test_summary_before_init_and_measure_after_trace():
    model = saq.quantize(tiny())
    s = saq.summary(model, example_inputs=torch.randn(1, 3, 8, 8))  # traces: roles and MACs known
    assert all(r.w_step_mean is None for r in s.rows)
    assert s.macs == sum(MACS.values())
    for _, m in saq.quant_layers(model):
        m._saq_macs = None
    assert saq.bops(model, example_inputs=torch.randn(5, 3, 8, 8)) == \
        6912 * 64 + 1728 * 16 + 576 * 16 + 960 * 64  # default 4/4 bits, first/last 8/8
    assert math.isclose(saq.summary(model).compression, saq.summary(model).float_bits / saq.model_size_bits(model))
