"""A whole Llama-architecture causal LM (tiny LlamaForCausalLM from a config) exported to ONNX with
torchsaq.export.causal_lm: weight-only group-wise Linear layers as MatMulNBits (and quantized embeddings as
GatherBlockQuantized), logits in onnxruntime's default session against PyTorch's, with and without a KV cache."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import torchsaq as saq

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from torchsaq.export.causal_lm import export_causal_lm  # noqa: E402
from torchsaq.export.onnx import onnx_layers  # noqa: E402

VOCAB = 64


def llama(tie=False, **quant):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).float()
    opts = dict(w_bits=4, a_bits=None, group_size=32)
    opts.update(quant)
    saq.quantize(model, saq.QuantConfig(**opts))
    model.train()
    model(input_ids=_ids(2, 16, seed=99))  # first forward: first/last layers, steps initialised
    return model.eval()


def _ids(batch, length, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("embedding_bits", [None, 4])
def test_llama_logits_in_a_default_session(tmp_path, embedding_bits):
    model = llama(embedding_bits=embedding_bits)
    path = tmp_path / "lm.onnx"
    export_causal_lm(model, path)
    ops = _ops(path)
    assert ops["MatMulNBits"] == 15  # 2 layers x 7 projections + lm_head
    assert ops["GatherBlockQuantized"] == (1 if embedding_bits else 0)
    assert onnx_layers(path)["lm_head"]["kernel"] == "MatMulNBits"
    sess = ort.InferenceSession(str(path))  # default options
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    for batch, length in [(2, 8), (1, 5), (3, 13)]:  # batch and sequence are symbolic
        x = _ids(batch, length, seed=length)
        with torch.no_grad():
            want = model(input_ids=x).logits.numpy()
        got = sess.run(None, {"input_ids": x.numpy()})[0]
        assert got.shape == want.shape
        assert _rel(got, want) < 1e-4, (batch, length)


def test_llama_with_kv_cache_matches_the_full_forward(tmp_path):
    model = llama()
    path = tmp_path / "lm_kv.onnx"
    export_causal_lm(model, path, kv_cache=True)
    sess = ort.InferenceSession(str(path))
    names = [i.name for i in sess.get_inputs()]
    assert names == ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    for batch, prompt, new in [(2, 9, 3), (1, 4, 1)]:
        x = _ids(batch, prompt + new, seed=prompt)
        with torch.no_grad():
            full = model(input_ids=x).logits.numpy()
            cache = model(input_ids=x[:, :prompt], use_cache=True).past_key_values
        feeds = {"input_ids": x[:, prompt:].numpy()}
        for i, layer in enumerate(cache.layers):
            feeds[f"past_key_values.{i}.key"] = layer.keys.numpy()
            feeds[f"past_key_values.{i}.value"] = layer.values.numpy()
        logits, *present = sess.run(None, feeds)
        assert _rel(logits, full[:, prompt:]) < 1e-4
        assert present[0].shape == (batch, 2, prompt + new, 8)


def test_float_baseline_and_the_model_left_as_it_was(tmp_path):
    model = llama()
    before = model.config._attn_implementation
    x = _ids(1, 6)
    with torch.no_grad():
        want = model(input_ids=x).logits
    f = export_causal_lm(model, tmp_path / "f.onnx", quantized=False)
    q = export_causal_lm(model, tmp_path / "q.onnx")
    assert model.config._attn_implementation == before
    assert type(model.lm_head) is saq.QuantLinear
    assert _ops(tmp_path / "f.onnx")["MatMulNBits"] == 0 and f.file_bytes > q.file_bytes
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, want)


def test_a_model_that_has_not_run_is_refused(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = saq.quantize(transformers.LlamaForCausalLM(cfg), saq.QuantConfig(w_bits=4, a_bits=None, group_size=32))
    with pytest.raises(ValueError, match="has not run yet"):
        export_causal_lm(model, tmp_path / "lm.onnx")
    assert not (tmp_path / "lm.onnx").exists()


def test_accuracy_level_4_is_written_on_request_and_stays_close(tmp_path):
    model = llama()
    path = tmp_path / "lm4.onnx"
    export_causal_lm(model, path, nbits_accuracy_level=4)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nodes)
    x = _ids(2, 8)
    with torch.no_grad():
        want = model(input_ids=x).logits.numpy()
    got = ort.InferenceSession(str(path)).run(None, {"input_ids": x.numpy()})[0]
    assert _rel(got, want) < 5e-2  # int8 activations: an approximation, not the model's numbers
    with pytest.raises(ValueError, match="nbits_accuracy_level"):
        export_causal_lm(model, tmp_path / "bad.onnx", nbits_accuracy_level=5)
