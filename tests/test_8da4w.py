"""torchao's 8da4w scheme: int8 per-token dynamic asymmetric activations (``QuantConfig(a_mode="dynamic_token")``)
with group-wise LSQ weights. A float64 reference of the per-token rule written out here, the straight-through
gradient, a tiny Llama trained with SAQ, checkpoint / safetensors / ONNX round trips, the CLI flag and the config
checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq.export.safetensors import load_exported
from torchsaq.quant.convert import QuantConfig
from torchsaq.quant.dynamic import DynamicTokenQuantizer, dynamic_token_fake_quant


def ref_token_fq(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's per-token int8 asymmetric fake-quantization in float64, row by row: (output, inside-range mask)."""
    out = torch.empty_like(x, dtype=torch.float64)
    inside = torch.empty_like(x, dtype=torch.bool)
    rows = x.reshape(-1, x.shape[-1]).double()
    for i, row in enumerate(rows):
        lo = min(float(row.min()), 0.0)
        hi = max(float(row.max()), 0.0)
        scale = max((hi - lo) / 255.0, float(torch.finfo(torch.float32).eps))
        zp = min(max(-128 - round(lo / scale), -128), 127)  # round: half to even, as torch.round
        v = torch.round(row * (1.0 / scale)) + zp
        inside.view(-1, x.shape[-1])[i] = (v >= -128) & (v <= 127)
        out.view(-1, x.shape[-1])[i] = (v.clamp(-128, 127) - zp) * scale
    return out, inside


def _rows(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 24, generator=g, dtype=dtype) * torch.linspace(0.01, 5, 7, dtype=dtype).view(1, 7, 1)
    x[0, 0] = 0.0  # a row of zeros: scale eps, zero point -128, output 0
    x[0, 1] = 1.25  # all equal and positive: the range [0, 1.25]
    x[0, 2] = -0.75  # all equal and negative: [-0.75, 0]
    x[1, 0] = x[1, 0].abs() + 0.5  # all positive
    x[1, 1] = -(x[1, 1].abs() + 0.5)  # all negative
    return x


def test_forward_matches_float64_reference_bit_exactly():
    x = _rows()
    want, _ = ref_token_fq(x)
    assert torch.equal(dynamic_token_fake_quant(x), want)
    assert torch.equal(want[0, 0], torch.zeros(24, dtype=torch.float64))
    torch.testing.assert_close(want[0, 1], torch.full((24,), 1.25, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(want[0, 2], torch.full((24,), -0.75, dtype=torch.float64), rtol=0, atol=1e-15)


def test_float32_forward_within_float32_rounding_of_the_reference():
    x = _rows(torch.float32)
    got = dynamic_token_fake_quant(x)
    want, _ = ref_token_fq(x.double())
    # a code may differ only where x/scale sits on a rounding tie within float32 precision: none in this data
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert torch.equal(got[0, 0], torch.zeros(24))
    assert dynamic_token_fake_quant(x.half()).dtype == torch.float16


def test_levels_per_row_are_at_most_256_and_hold_zero():
    x = _rows()
    y = dynamic_token_fake_quant(x)
    for row_x, row_y in zip(x.reshape(-1, 24), y.reshape(-1, 24)):
        scale = (max(float(row_x.max()), 0) - min(float(row_x.min()), 0)) / 255
        if scale > 0:
            assert float((row_y - row_x).abs().max()) <= scale / 2 + 1e-12
            codes = row_y / scale
            assert torch.allclose(codes, codes.round(), atol=1e-6)


def test_gradient_is_straight_through_zero_where_clamped():
    x = _rows().requires_grad_()
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dynamic_token_fake_quant(x).backward(up)
    _, inside = ref_token_fq(x.detach())
    assert torch.equal(x.grad, torch.where(inside, up, torch.zeros_like(up)))


def test_quantizer_has_nothing_to_learn_and_only_8_or_32_bits():
    q = DynamicTokenQuantizer()
    assert q.is_initialized and q.signed and list(q.parameters()) == []
    q.bits = 32
    x = torch.randn(2, 8)
    assert q(x) is x
    with pytest.raises(ValueError, match="int8 per token"):
        q.bits = 4


# ------------------------------------------------------------------------------------------ config and CLI
def test_config_checks_are_one_line_errors():
    assert QuantConfig().a_mode == "static" and "a_mode" not in QuantConfig().to_dict()
    cfg = QuantConfig(a_bits=8, group_size=16, a_mode="dynamic_token")
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    for kw, msg in [(dict(a_mode="dynamic"), "unknown a_mode"),
                    (dict(a_mode="dynamic_token"), "needs a_bits=8, got 4"),
                    (dict(a_mode="dynamic_token", a_bits=None), "needs a_bits=8, got None"),
                    (dict(a_mode="dynamic_token", a_bits=8, quantizer="liq"), "pairs with LSQ"),
                    (dict(a_mode="dynamic_token", a_bits=8, first_last_bits=4), "first_last_bits must be 8 or 32"),
                    (dict(a_mode="dynamic_token", a_bits=8, layer_bits={"0": 4}), "must be 8 or 32")]:
        with pytest.raises(ValueError, match=msg) as e:
            QuantConfig(**kw)
        assert "\n" not in str(e.value)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3))
    with pytest.raises(ValueError, match="layer 0 is a Conv2d: exclude it"):
        saq.quantize(conv, QuantConfig(a_bits=8, a_mode="dynamic_token"))
    assert type(conv[0]) is nn.Conv2d
    saq.quantize(conv, QuantConfig(a_bits=8, a_mode="dynamic_token", exclude=("0",)))


def test_cli_flag_reaches_the_quant_config():
    from torchsaq.cli import build_parser
    from torchsaq.train.config import TrainConfig

    args = build_parser().parse_args(["train", "--a-mode", "dynamic_token", "--a-bits", "8", "--group-size", "16"])
    assert args.a_mode == "dynamic_token"
    cfg = TrainConfig(a_mode=args.a_mode, a_bits=args.a_bits, group_size=args.group_size)
    assert cfg.quant_config() == QuantConfig(a_bits=8, group_size=16, a_mode="dynamic_token")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--a-mode", "per_token"])
    with pytest.raises(ValueError, match="needs a_bits=8"):
        TrainConfig(a_mode="dynamic_token").validate()


# ------------------------------------------------------------------------------------------------ models
def _mlp(seed=0, a_mode="dynamic_token"):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    cfg = QuantConfig(w_bits=4, a_bits=8, group_size=16, a_mode=a_mode)
    return saq.quantize(m, cfg, example_inputs=torch.randn(2, 32))


def _trained_mlp(seed=0):
    model = _mlp(seed)
    model.train()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
    opt = saq.SAQ(model, torch.optim.AdamW(model.parameters(), lr=1e-2), rho=0.1, mode="case3")

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    for _ in range(2):
        opt.step(closure)
        opt.zero_grad()
    return model.eval()


def test_layers_summary_and_forward_use_the_per_token_rule():
    model = _mlp()
    layers = saq.quant_layers(model)
    assert all(isinstance(layer.act_quantizer, DynamicTokenQuantizer) for _, layer in layers)
    assert [layer.w_bits for _, layer in layers] == [8, 4, 8]  # first/last at 8 bits, inputs int8 everywhere
    model.train()
    x = torch.randn(5, 3, 32)
    h = model[0](x)
    want = F.linear(dynamic_token_fake_quant(x), model[0].quantized_weight(), model[0].bias)
    assert torch.equal(h, want)
    text = str(saq.summary(model))
    rows = saq.summary(model).rows
    assert all(r.a_mode == "dynamic_token" and r.a_step is None and r.a_bits == 8 for r in rows)
    assert "token" in text and "g16" in text


@pytest.mark.parametrize("mode", ["case1", "case2", "case3"])
def test_saq_perturbs_the_group_quantized_weights(mode):
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
    model.train()
    opt = saq.SAQ(model, torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.5, mode=mode)
    seen: dict[str, list[bool]] = {n: [] for n, _ in saq.quant_layers(model)}

    def closure():
        for name, layer in saq.quant_layers(model):
            with torch.no_grad():
                clean = layer.weight_quantizer(layer.weight - (layer.perturb_pre if layer.perturb_pre is not None
                                                               else 0))
                seen[name].append(not torch.equal(layer.quantized_weight(), clean))
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    for _ in range(2):
        assert math.isfinite(float(opt.step(closure)))
        opt.zero_grad()
    assert all(any(v) for v in seen.values()), seen


def test_checkpoint_round_trip(tmp_path):
    model = _trained_mlp()
    x = torch.randn(4, 3, 32)
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    fresh = _mlp(seed=5)
    fresh.load_state_dict(torch.load(tmp_path / "ck.pt"))
    assert torch.equal(fresh.eval()(x), model(x))


def test_safetensors_records_the_scheme_and_reproduces_it(tmp_path):
    model = _trained_mlp()
    x = torch.randn(4, 3, 32)
    with torch.no_grad():
        want = model(x)
    path = tmp_path / "m.safetensors"
    saq.export(model, path)
    for fresh in (_mlp(seed=7), _mlp(seed=7, a_mode="static")):  # a static model gets the dynamic inputs back
        load_exported(path, fresh)
        assert all(isinstance(layer.act_quantizer, DynamicTokenQuantizer) for _, layer in saq.quant_layers(fresh))
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), want)
    static = _mlp(seed=1, a_mode="static")
    static.train()
    static(torch.randn(8, 32))
    saq.export(static.eval(), tmp_path / "s.safetensors")
    back = _mlp(seed=2)  # and the other way: the file's static steps replace the dynamic quantizers
    load_exported(tmp_path / "s.safetensors", back)
    assert not any(isinstance(layer.act_quantizer, DynamicTokenQuantizer) for _, layer in saq.quant_layers(back))
    with torch.no_grad():
        assert torch.equal(back.eval()(x), static(x))


def test_onnx_export_matches_pytorch_in_a_default_session(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from torchsaq.export.onnx import onnx_layers

    model = _trained_mlp()
    x = torch.randn(6, 5, 32)
    x[0, 0] = 0.0
    x[0, 1] = 2.0
    with torch.no_grad():
        want = model(x)
        want_act = dynamic_token_fake_quant(x)
    path = tmp_path / "m.onnx"
    saq.export(model, path, example_inputs=(x,))
    record = onnx_layers(path)
    assert all(r["a_mode"] == "dynamic_token" and r["kernel"] == "MatMulNBits" for r in record.values())
    got = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)  # (MatMulNBits' sum order)
    # the quantized input itself, bit for bit: expose the first layer's per-token output as a graph output
    proto = onnx.load(str(path))
    act = next(n.output[0] for n in proto.graph.node if n.name == "0/input_out")
    proto.graph.output.append(onnx.helper.make_tensor_value_info(act, onnx.TensorProto.FLOAT, None))
    path2 = tmp_path / "act.onnx"
    onnx.save(proto, str(path2))
    got_act = ort.InferenceSession(str(path2)).run([act], {"input": x.numpy()})[0]
    assert torch.equal(torch.from_numpy(got_act), want_act)


# ------------------------------------------------------------------------------------------------ a tiny Llama
def test_tiny_llama_8da4w_trains_with_saq_adamw():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).float()
    saq.quantize(model, QuantConfig(w_bits=4, a_bits=8, group_size=16, a_mode="dynamic_token"))
    layers = saq.quant_layers(model)
    assert layers and all(isinstance(layer.act_quantizer, DynamicTokenQuantizer) for _, layer in layers)
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    opt = saq.SAQ(model, torch.optim.AdamW(model.parameters(), lr=3e-3), rho=0.05, mode="case3")

    def closure():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    losses = []
    for _ in range(6):
        losses.append(float(opt.step(closure)))
        opt.zero_grad()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    closure()
    for name, layer in layers:
        assert layer.weight_quantizer.group_size == 16 and layer.weight_quantizer.step.grad is not None, name
