"""Quantized ``nn.Embedding`` tables (``QuantConfig(embedding_bits=...)``): a float64 reference, codes, SAQ, export and
tied input/output embeddings."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsaq as saq
from torchsaq.export.safetensors import load_exported
from torchsaq.optim.saq import SAQ
from torchsaq.quant.convert import QuantConfig
from torchsaq.quant.layers import QuantEmbedding


class TinyLM(nn.Module):
    def __init__(self, vocab=40, dim=16, tied=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.emb(x))))


def _lm(seed=0, tied=False, **cfg):
    torch.manual_seed(seed)
    m = TinyLM(tied=tied)
    opts = dict(w_bits=4, a_bits=None, embedding_bits=3)
    opts.update(cfg)
    return saq.quantize(m, QuantConfig(**opts), example_inputs=_tokens())


def _tokens(seed=0, shape=(4, 9)):
    return torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(seed))


def ref_table(w, s, group, bits, upstream):
    """Group-wise (group = the row: per row) LSQ of the table in float64: (forward, dL/dw, dL/ds)."""
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows, n = w.shape
    wg, ug, sg = w.reshape(rows, n // group, group), upstream.reshape(rows, n // group, group), s.reshape(rows, -1, 1)
    v = wg / sg
    inside = (v >= qn) & (v <= qp)
    y = torch.round(torch.clamp(v, qn, qp)) * sg
    gw = torch.where(inside, ug, torch.zeros_like(ug))
    gs = (ug * torch.where(inside, torch.round(v) - v, torch.clamp(v, qn, qp))).sum(-1) / math.sqrt(group * qp)
    return y.reshape(rows, n), gw.reshape(rows, n), gs.reshape(s.shape)


@pytest.mark.parametrize("group_size", [None, 4, 8])
@pytest.mark.parametrize("bits", [2, 4])
def test_embedding_forward_and_grads_match_float64_reference(group_size, bits):
    model = _lm(group_size=group_size, embedding_bits=bits).double()
    emb = model.emb
    assert isinstance(emb, QuantEmbedding)
    x = _tokens()
    model.train()
    model(x)  # initialises the steps
    with torch.no_grad():
        emb.weight_quantizer.step.mul_(0.7)  # some clipping
    emb.zero_grad()
    up = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = emb(x)
    out.backward(up)
    table = torch.zeros(40, 16, dtype=torch.float64, requires_grad=True)
    F.embedding(x, table).backward(up)  # dL/d(table) for the quantized table
    group = group_size or 16
    ry, rgw, rgs = ref_table(emb.weight.detach(), emb.weight_quantizer.step.detach(), group, bits, table.grad)
    torch.testing.assert_close(out.detach(), F.embedding(x, ry), rtol=0, atol=1e-12)
    torch.testing.assert_close(emb.weight.grad, rgw, rtol=0, atol=0)
    torch.testing.assert_close(emb.weight_quantizer.step.grad, rgs, rtol=1e-10, atol=1e-12)
    assert emb.weight_quantizer.step.shape == ((40,) if group_size is None else (40, 16 // group_size))


def test_embedding_is_weight_only_without_role_or_macs():
    model = _lm(group_size=8)
    model.train()
    model(_tokens())
    emb = model.emb
    assert emb.w_bits == 3 and emb.a_bits == 32 and emb.quant_role is None
    assert model.fc.quant_role == "first" and model.head.quant_role == "last"
    row = saq.summary(model).rows[0]
    assert row.type == "Embedding" and row.macs == 0 and row.a_bits == 32 and row.group_size == 8
    codes = emb.weight_quantizer.integer(emb.weight.detach())
    assert torch.equal(emb.weight_quantizer.dequantize(codes), emb.quantized_weight().detach())
    lo, hi = emb.weight_quantizer.code_range()
    assert int(codes.min()) >= lo and int(codes.max()) <= hi


def test_embeddings_stay_float_unless_asked():
    torch.manual_seed(0)
    m = saq.quantize(TinyLM(), QuantConfig(w_bits=4, a_bits=None))
    assert type(m.emb) is nn.Embedding
    m = saq.quantize(TinyLM(), QuantConfig(w_bits=4, a_bits=None, embedding_bits=4, layer_bits={"emb": (6, 6)}))
    assert m.emb.w_bits == 6 and m.emb.a_bits == 32  # the indices are never quantized
    with pytest.raises(ValueError, match="max_norm"):
        saq.quantize(nn.Sequential(nn.Embedding(4, 4, max_norm=1.0), nn.Linear(4, 2)), QuantConfig(embedding_bits=4))
    with pytest.raises(ValueError, match="embedding_bits"):
        QuantConfig(embedding_bits=1)


@pytest.mark.parametrize("mode", ["sam", "case1", "case2", "case3"])
def test_saq_perturbs_the_quantized_table(mode):
    model = _lm(group_size=8)
    x = _tokens(1)
    y = _tokens(2)
    model.train()
    model(x)
    opt = SAQ(model, torch.optim.AdamW(model.parameters(), lr=1e-3), rho=0.5, mode=mode)
    with torch.no_grad():
        clean = model.emb.weight_quantizer(model.emb.weight).clone()
    used, pre = [], []

    def closure():
        with torch.no_grad():
            used.append(model.emb.quantized_weight().clone())
            pre.append(model.emb.perturb_pre)
        loss = F.cross_entropy(model(x).reshape(-1, 40), y.reshape(-1))
        loss.backward()
        return loss.detach()

    loss = opt.step(closure)
    assert math.isfinite(float(loss)) and len(used) == 2
    assert torch.equal(used[0], clean)
    if mode == "case2":  # before the rounding, which may absorb a small perturbation
        assert pre[0] is None and pre[1] is not None and bool(pre[1].ne(0).any())
    else:
        assert not torch.equal(used[1], clean)


def test_safetensors_and_state_dict_round_trips(tmp_path):
    model = _lm(group_size=4, seed=1)
    x = _tokens()
    model.train()
    model(x).sum().backward()
    model.eval()
    want = model(x)
    path = tmp_path / "m.safetensors"
    saq.export(model, path)
    fresh = _lm(seed=5)  # per-row in the fresh model: the file's groups win
    load_exported(path, fresh)
    fresh.eval()
    assert torch.equal(fresh(x), want)
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    again = _lm(group_size=4, seed=6)
    again.load_state_dict(torch.load(tmp_path / "ck.pt"))
    again.eval()
    assert torch.equal(again(x), want)


@pytest.mark.parametrize("group_size", [None, 16])
def test_onnx_export_of_a_quantized_embedding_matches_pytorch(tmp_path, group_size):
    np = pytest.importorskip("numpy")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _lm(embedding_bits=4, group_size=group_size)
    model.train()
    model(_tokens())
    model.eval()
    x = _tokens(1)
    saq.export(model, tmp_path / "m.onnx", example_inputs=(x,))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    # per-row steps: DequantizeLinear (axis 0) -> Gather; groups (16 of a row): GatherBlockQuantized
    assert ("GatherBlockQuantized" in ops) == (group_size is not None)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for t in (x, _tokens(2, (1, 9))):  # (a dynamic batch; the sequence length is fixed in a plain export)
        got = sess.run(None, {sess.get_inputs()[0].name: t.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(t).numpy(), rtol=1e-5, atol=1e-5)


def _onnx_logits(path, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path))  # default options
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("quantized", ["both", "head", "embedding", "neither"])
def test_tied_embeddings_export_and_round_trip(tmp_path, quantized):
    """One shared Parameter: each quantized user stores its own codes, a float user the float table (once)."""
    pytest.importorskip("onnx")
    opts = {"both": {}, "head": dict(embedding_bits=None), "embedding": dict(exclude=("head",)),
            "neither": dict(embedding_bits=None, exclude=("head",))}[quantized]
    model = _lm(tied=True, **opts)
    assert model.head.weight is model.emb.weight  # still tied: one latent table, quantized by each user
    x = _tokens()
    model.train()
    model(x).sum().backward()
    assert model.emb.weight.grad is not None
    model.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(x)
    saq.export(model, tmp_path / "m.safetensors")
    with safetensors_open(tmp_path / "m.safetensors") as f:
        keys = set(f.keys())
    assert ("emb.weight_codes" in keys) == (quantized in ("both", "embedding"))
    assert ("head.weight_codes" in keys) == (quantized in ("both", "head"))
    float_keys = {"emb.weight", "head.weight"} & keys
    assert len(float_keys) == (0 if quantized == "both" else 1 if quantized != "neither" else 2)
    back = _lm(tied=True, seed=3, **opts)
    load_exported(tmp_path / "m.safetensors", back)
    back.eval()
    with torch.no_grad():
        assert torch.equal(back(x), want)
    # both quantized: two different tables, so the loaded model holds two Parameters; else it stays tied
    assert (back.head.weight is back.emb.weight) == (quantized != "both")
    saq.export(model, tmp_path / "m.onnx", example_inputs=(x,))
    torch.testing.assert_close(_onnx_logits(tmp_path / "m.onnx", x), want, rtol=1e-5, atol=1e-5)


def safetensors_open(path):
    import safetensors

    return safetensors.safe_open(str(path), framework="pt")
