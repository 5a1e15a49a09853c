"""ONNX export: a QDQ graph with INT4/UINT4 weights that onnxruntime runs, its outputs against the PyTorch model
(every optimization level, both flavours, the registry and zoo models: test_onnx_sessions.py).

Tolerance (see :func:`assert_agrees`): LSQ weights are bit-exact in the graph (DequantizeLinear computes the
same ``code * step`` product); LIQ weights differ by at most an ulp (the same levels, computed as
``odd_int * |clip|/(2^k-1)`` instead of ``(c/(2^k-1)*2 - 1) * |clip|``). Both runtimes round half to even.
What differs is the float arithmetic around the quantizers (convolution/matmul accumulation order, BatchNorm
not folded, LayerNorm, GELU, softmax): ~1e-7 relative. So nearly every sample agrees to ~1e-6; but an
activation whose ``x / step`` lands within that rounding of a tie (k + 0.5) may round to the neighbouring
code in one runtime, and that one-step change propagates (measured: 2 of 32 DeiT-tiny samples, 1 of 8
ResNet-18 samples on random inputs). Hence the checks: argmax agreement >= 99%, median per-sample relative
error < 1e-5 (any wrong scale, zero point, sign or container would break it on every sample) and at least
90% of the samples within 1e-4.
"""
import os
import re

import numpy as np

import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import torchsaq as saq  # noqa: E402
from torchsaq.cli import main  # noqa: E402
from torchsaq.export.onnx import CONTAINERS, export_onnx, onnx_layers  # noqa: E402

TP = onnx.TensorProto
INT_TYPES = {TP.INT4: "INT4", TP.UINT4: "UINT4", TP.INT8: "INT8", TP.UINT8: "UINT8"}


class TinyResNet(nn.Module):
    """Stem conv-BN-ReLU, a basic residual block, a strided block with a 1x1 shortcut, GAP, linear head."""

    def __init__(self, w: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                               nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w))
        self.b = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                               nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w))
        self.short = nn.Sequential(nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w))
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        x = torch.relu(self.short(x) + self.b(x))
        return self.fc(x.mean((2, 3)))


def prepared(model, cfg, shape, steps=2):
    """Quantize, then a few SGD steps (steps, clips and BatchNorm statistics move off their init), or with
    ``steps=0`` training-mode forward passes only (BatchNorm statistics); eval mode."""
    saq.quantize(model, cfg).train()
    if not steps:
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(shape))
        return model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(shape)).square().mean().backward()
        opt.step()
    return model.eval()


def run_ort(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def assert_agrees(out, ref):
    """The tolerance of the module docstring: argmax, median and 90% of the per-sample relative errors."""
    ref = ref.numpy() if torch.is_tensor(ref) else ref
    assert out.shape == ref.shape
    rel = np.abs(out - ref).max(axis=1) / np.abs(ref).max(axis=1)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99, rel
    assert np.median(rel) < 1e-5, rel
    assert (rel < 1e-4).mean() >= 0.9, rel


def initializers(path):
    proto = onnx.load(str(path))
    return proto, {t.name: t for t in proto.graph.initializer}


def check_graph(path, model):
    """Every quantized weight is an integer initializer through DequantizeLinear, no float copy is left."""
    proto, inits = initializers(path)
    assert proto.opset_import[0].version >= 21 and all(o.domain in ("", "ai.onnx") for o in proto.opset_import)
    record = onnx_layers(path)
    ops = {n.name: n for n in proto.graph.node}
    for name, layer in saq.quant_layers(model):
        info = record[name]
        assert name + ".weight" not in inits, name
        q = inits[name + ".weight_quantized"]
        assert INT_TYPES[q.data_type] == info["w_container"], name
        assert info["w_container"] in (("INT4", "UINT4") if layer.w_bits <= 4 else ("INT8", "UINT8")), name
        assert ops[f"{name}/weight_dq"].op_type == "DequantizeLinear"
        z = inits[name + ".input_zero_point"]
        assert INT_TYPES[z.data_type] == info["a_container"], name
        lo, hi = info["a_range"]
        assert (lo < 0) == bool(layer.act_quantizer.signed)
        # activations in 8-bit containers at every bit width, the low-bit range kept by a Clip after the DQ
        assert info["a_container"] == ("INT8" if lo < 0 else "UINT8"), name
        a, b = CONTAINERS[info["a_container"]]
        assert a <= lo and hi <= b and hi - lo in (2 ** layer.a_bits - 1, 2 ** layer.a_bits - 2), name  # LIQ: symmetric
        assert ops[f"{name}/input_clip"].op_type == "Clip", name
        # nothing computes directly on a DequantizeLinear output (see export_onnx._act_qdq and _weight_dq)
        consumer = [n for n in proto.graph.node if f"{name}/input_dq_out" in n.input]
        assert [n.op_type for n in consumer] == ["Clip"], name
    return record


# -- CNNs: both quantizers, 2/3/4 bits ------------------------------------------------------------------
@pytest.mark.parametrize("kind,bits,per_channel,ws", [
    ("lsq", 4, True, False), ("lsq", 3, True, False), ("lsq", 2, False, True),
    ("liq", 4, True, False), ("liq", 3, True, False), ("liq", 2, True, False)])
def test_cnn_matches_pytorch(tmp_path, kind, bits, per_channel, ws):
    model = prepared(TinyResNet(), saq.QuantConfig(w_bits=bits, a_bits=bits, quantizer=kind, per_channel=per_channel,
                                                   weight_standardize=ws), (8, 3, 16, 16))
    path = tmp_path / "m.onnx"
    info = saq.export(model, path, example_inputs=(torch.randn(1, 3, 16, 16),))  # the suffix picks ONNX
    assert info.file_bytes == os.path.getsize(path)
    record = check_graph(path, model)
    mid = record["a.0"]
    assert mid["w_bits"] == bits and mid["a_container"] == "UINT8"  # after a ReLU: unsigned
    if kind == "liq":  # odd integers in INT4 where they fit, else UINT4 codes + zero point + half-step Add
        assert mid["w_container"] == ("UINT4" if bits == 4 else "INT4")
        assert record["stem.0"]["w_container"] == "UINT8" and record["stem.0"]["a_range"] == [-127, 127]
    else:
        assert mid["w_container"] == "INT4" and mid["w_axis"] == (0 if per_channel else None)
        assert record["fc"]["w_axis"] == (1 if per_channel else None)  # Linear weights stored (in, out)
        assert record["stem.0"]["w_container"] == "INT8" and record["stem.0"]["a_range"] == [-128, 127]
    x = torch.randn(128, 3, 16, 16) * 1.5  # other batch size than traced: the batch dimension is symbolic
    with torch.no_grad():
        ref = model(x)
    assert_agrees(run_ort(path, x), ref)


@pytest.mark.slow
def test_torchvision_mobilenet_v2(tmp_path):
    import torchvision

    model = prepared(torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25),
                     saq.QuantConfig(w_bits=4, a_bits=4), (4, 3, 32, 32), steps=0)
    path = tmp_path / "mnv2.onnx"
    saq.export(model, path, example_inputs=(torch.randn(1, 3, 32, 32),))
    check_graph(path, model)
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    assert_agrees(run_ort(path, x), ref)


@pytest.mark.parametrize("kind", ["lsq", "liq"])
def test_vit_signed_activations(tmp_path, kind):
    model = prepared(saq.create_model("vit_tiny_digits", 10), saq.QuantConfig(w_bits=4, a_bits=4, quantizer=kind),
                     (8, 1, 8, 8))
    path = tmp_path / "vit.onnx"
    saq.export(model, path, example_inputs=(torch.randn(2, 1, 8, 8),))
    record = check_graph(path, model)
    # LayerNorm outputs feed qkv and fc1: signed activations (symmetric [-7, 7] for LIQ)
    for name in ("blocks.0.attn.qkv", "blocks.3.mlp.fc1"):
        assert record[name]["a_container"] == "INT8", name
        assert record[name]["a_range"] == ([-8, 7] if kind == "lsq" else [-7, 7])
    x = torch.randn(256, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
    assert_agrees(run_ort(path, x), ref)


# -- ResNet-18: size and outputs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """torchvision ResNet-18 (10 classes), w4a4 LSQ and LIQ (first/last 8 bits), and its float ONNX."""
    import torchvision

    folder = tmp_path_factory.mktemp("resnet18")
    torch.manual_seed(0)
    out = {}
    x = torch.randn(1, 3, 32, 32)
    for kind in ("lsq", "liq"):
        model = saq.quantize(torchvision.models.resnet18(num_classes=10), saq.QuantConfig(w_bits=4, a_bits=4,
                                                                                         quantizer=kind))
        saq.calibrate(model, [torch.randn(4, 3, 32, 32)])
        model.eval()
        out[kind] = (model, folder / f"{kind}.onnx")
        saq.export(model, out[kind][1], example_inputs=(x,))
    out["float"] = folder / "float.onnx"
    export_onnx(out["lsq"][0], out["float"], (x,), quantized=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lsq", "liq"])
def test_resnet18_five_times_smaller_than_float_onnx(resnet18, kind):
    model, path = resnet18[kind]
    float_bytes, q_bytes = os.path.getsize(resnet18["float"]), os.path.getsize(path)
    assert float_bytes > 40e6  # 11.2M float32 parameters
    assert float_bytes / q_bytes >= 5, (float_bytes, q_bytes)  # measured 7.9x: 4-bit middle, 8-bit first/last
    proto, _ = initializers(resnet18["float"])
    assert not [n for n in proto.graph.node if "Quantize" in n.op_type]  # the baseline is float32 throughout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lsq", "liq"])
def test_resnet18_matches_pytorch(resnet18, kind):
    model, path = resnet18[kind]
    check_graph(path, model)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    assert_agrees(run_ort(path, x), ref)


# -- CLI and errors ---------------------------------------------------------------------------------------------
def test_cli_exports_a_checkpoint_to_onnx(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--sharpness", "none", "--output", str(run), "--batch-size", "32",
                 "--limit-train-batches", "2", "--limit-eval-batches", "1",
                 "--model-kwargs", "{channels: [8, 8]}"]) == 0
    capsys.readouterr()
    out = tmp_path / "model.onnx"
    assert main(["export", str(run), str(out)]) == 0
    assert re.search(r"x (smaller|larger) than the float32 state dict", capsys.readouterr().out)
    model, _, _ = saq.checkpoint.load_model(run / "checkpoint.pt")
    check_graph(out, model)
    x = torch.randn(64, 1, 40)  # MNIST-1D: Conv1d layers
    with torch.no_grad():
        ref = model(x)
    assert_agrees(run_ort(out, x), ref)
    assert main(["export", str(run), str(out)]) == 0  # replaces its own earlier export
    other = tmp_path / "notes.onnx"
    other.write_text("not a model")
    assert main(["export", str(run), str(other)]) == 1
    assert "not a torchsaq ONNX export" in capsys.readouterr().err
    assert other.read_text() == "not a model"


def test_errors(tmp_path):
    model = saq.quantize(TinyResNet(), saq.QuantConfig())
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="not run yet|not initialised"):
        saq.export(model, tmp_path / "m.onnx", example_inputs=(x,))
    saq.calibrate(model, [x])
    with pytest.raises(ValueError, match="example_inputs"):
        saq.export(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="opset"):
        saq.export(model, tmp_path / "m.onnx", example_inputs=x, opset=20)
    with pytest.raises(ValueError, match=".onnx files only"):
        saq.export(model, tmp_path / "m.safetensors", opset=21)
    assert not list(tmp_path.iterdir())
    saq.export(model, tmp_path / "m.safetensors", example_inputs=x)  # safetensors stays the default format
    assert (tmp_path / "m.safetensors").read_bytes()[8:9] == b"{"
    before = {n: p.clone() for n, p in model.state_dict().items()}
    saq.export(model, tmp_path / "m.onnx", example_inputs=x)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the model is left as it was
    assert all(type(m).__name__.startswith("Quant") for _, m in saq.quant_layers(model))
