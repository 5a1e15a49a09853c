"""Group-wise weight-only Linear layers exported to ONNX as onnxruntime's com.microsoft.MatMulNBits: parity with
PyTorch in a default InferenceSession."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import torchsaq as saq
from torchsaq.export.onnx import onnx_layers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _model(w_bits=4, group_size=32, first_last_bits=8, a_bits=None, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False), nn.GELU(), nn.Linear(64, 32))
    saq.quantize(m, saq.QuantConfig(w_bits=w_bits, a_bits=a_bits, group_size=group_size,
                                    first_last_bits=first_last_bits))
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(seed))  # (batch, tokens, features)
    m.train()
    m(x)
    return m.eval(), x


def _run(path, x):
    sess = ort.InferenceSession(str(path))  # default options: every graph optimization on
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("w_bits,first_last", [(4, 8), (2, 4), (3, 3), (6, 8)])
@pytest.mark.parametrize("mode", ["compact", "fast"])
def test_matmul_nbits_parity_with_pytorch(tmp_path, w_bits, first_last, mode):
    model, x = _model(w_bits=w_bits, first_last_bits=first_last)
    with torch.no_grad():
        want = model(x).numpy()
    path = tmp_path / "m.onnx"
    saq.export(model, path, example_inputs=(x,), onnx_mode=mode)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 3 and "DequantizeLinear" not in ops and "MatMul" not in ops
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert all(n.domain == "com.microsoft" for n in nodes)
    attrs = {a.name: a.i for a in nodes[1].attribute}
    assert attrs["block_size"] == 32 and attrs["K"] == 128 and attrs["N"] == 64
    assert attrs["bits"] == (4 if w_bits <= 4 else 8)
    np.testing.assert_allclose(_run(path, x), want, rtol=1e-5, atol=1e-5)
    record = onnx_layers(path)
    assert all(r["kernel"] == "MatMulNBits" and r["w_block"] == 32 for r in record.values())


def test_matmul_nbits_is_smaller_than_the_float_graph(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    saq.quantize(m, saq.QuantConfig(w_bits=4, a_bits=None, group_size=64, first_last_bits=4))
    x = torch.randn(1, 256)
    m.train()
    m(x)
    m.eval()
    q = saq.export(m, tmp_path / "q.onnx", example_inputs=(x,))
    f = saq.export(m, tmp_path / "f.onnx", example_inputs=(x,), quantized=False)
    assert f.file_bytes > 5 * q.file_bytes
    with torch.no_grad():
        np.testing.assert_allclose(_run(tmp_path / "q.onnx", x), m(x).numpy(), rtol=1e-5, atol=1e-5)


def test_group_sizes_matmul_nbits_cannot_take_are_refused(tmp_path):
    model, x = _model(group_size=8)
    with pytest.raises(ValueError, match="power of two >= 16"):
        saq.export(model, tmp_path / "m.onnx", example_inputs=(x,))
    assert not (tmp_path / "m.onnx").exists()


def test_activation_quantized_layers_with_groups_run_too(tmp_path):
    model, x = _model(a_bits=8)
    with torch.no_grad():
        want = model(x).numpy()
    saq.export(model, tmp_path / "m.onnx", example_inputs=(x,))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 3 and ops.count("QuantizeLinear") == 3
    np.testing.assert_allclose(_run(tmp_path / "m.onnx", x), want, rtol=1e-4, atol=1e-4)
