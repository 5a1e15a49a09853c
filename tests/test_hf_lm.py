"""Hugging Face causal LMs (tiny LlamaForCausalLM / GPT2LMHeadModel built from configs, no download): weight-only
group-wise quantization, SAQ with AdamW in a plain loop, and transformers.Trainer with closure-free prev_grad."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchsaq as saq

transformers = pytest.importorskip("transformers")

VOCAB = 64


def llama(tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).float()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).float()


BUILDERS = {"llama": llama, "gpt2": gpt2}


def _batch(seed=0, n=8, t=16):
    ids = torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _quantized(name, **cfg):
    model = BUILDERS[name]()
    opts = dict(w_bits=4, a_bits=None, group_size=32)
    opts.update(cfg)
    saq.quantize(model, saq.QuantConfig(**opts))
    return model


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_quantize_weight_only_groups_forward_backward(name):
    model = _quantized(name)
    layers = saq.quant_layers(model)
    assert layers and all(isinstance(layer, nn.Linear) for _, layer in layers)
    if name == "gpt2":  # Conv1D became Linear: every attention / MLP projection is quantized, per output row
        assert any(n.endswith("attn.c_attn") for n, _ in layers) and any(n.endswith("mlp.c_proj") for n, _ in layers)
        c_attn = dict(layers)["transformer.h.0.attn.c_attn"]
        assert c_attn.weight.shape == (96, 32) and c_attn.weight_quantizer.step.shape == (96, 1)
    model.train()
    out = model(**_batch())
    assert math.isfinite(float(out.loss.detach()))
    out.loss.backward()
    for n, layer in layers:
        assert not layer.act_quantizer.enabled, n
        assert layer.weight_quantizer.step.grad is not None, n
        assert layer.weight_quantizer.group_size == 32, n


def test_gpt2_conv1d_becomes_the_same_linear_function():
    model = gpt2().eval()
    batch = _batch()
    with torch.no_grad():
        want = model(**batch).logits
    params = {id(p) for p in model.parameters()}
    saq.quantize(model, saq.QuantConfig(w_bits=32, a_bits=None, first_last_bits=32))  # float: conversion only
    assert {id(p) for p in model.parameters()} - params == {id(q.scale) for q in model.modules()
                                                            if isinstance(q, saq.Quantizer)}
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_failed_quantize_gives_gpt2_its_conv1d_back():
    model = gpt2()
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    with pytest.raises(ValueError):
        saq.quantize(model, saq.QuantConfig(group_size=48))  # 32 inputs: 48 divides none of them
    c_attn = model.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "Conv1D" and torch.equal(c_attn.weight, w)


@pytest.mark.parametrize("strategy", ["full", "prev_grad"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_saq_adamw_steps_reduce_the_loss(name, strategy):
    model = _quantized(name)
    batch = _batch()
    model.train()
    opt = saq.SAQ(model, torch.optim.AdamW(model.parameters(), lr=3e-3), rho=0.05, mode="case3",
                  strategy=strategy)

    def closure():
        loss = model(**batch).loss
        loss.backward()
        return loss.detach()

    losses = []
    for _ in range(8):
        losses.append(float(opt.step(closure)))
        opt.zero_grad()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_calibrate_takes_input_ids_batches():
    model = _quantized("llama")
    saq.calibrate(model, [_batch(i) for i in range(2)])
    assert all(layer.weight_quantizer.is_initialized for _, layer in saq.quant_layers(model))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["prev_grad", "momentum"])
def test_hf_trainer_with_a_closure_free_strategy_on_a_group_quantized_llama(tmp_path, strategy):
    model = _quantized("llama")

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            self.ids = _batch(0, n=16)["input_ids"]

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    base = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt = saq.SAQ(model, base, rho=0.05, mode="case3", strategy=strategy)
    seen: list[bool] = []  # training forwards: perturbed?
    model.register_forward_hook(lambda m, a, o: seen.append(
        any(layer.perturb_post is not None for _, layer in saq.quant_layers(m))) if m.training else None)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4,
                                          num_train_epochs=1, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), optimizers=(opt, None))
    trainer.train()
    assert opt.step_count == 4 and opt.passes_last_step == 1
    assert seen == [False, True, True, True]  # the first step is unperturbed, then every forward is
    metrics = trainer.evaluate(Data())
    assert math.isfinite(metrics["eval_loss"])


def _trained(model, batch):
    model.train()
    model(**batch).loss.backward()
    model.zero_grad()
    return model.eval()


def test_llama_with_quantized_embeddings_exports_and_loads_bit_exactly(tmp_path):
    from torchsaq.export.safetensors import load_exported

    model = _trained(_quantized("llama", embedding_bits=4), _batch())
    assert isinstance(model.model.embed_tokens, saq.QuantEmbedding)
    with torch.no_grad():
        want = model(**_batch(1)).logits
    saq.export(model, tmp_path / "m.safetensors")
    fresh = _quantized("llama", embedding_bits=4, group_size=None)
    load_exported(tmp_path / "m.safetensors", fresh)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**_batch(1)).logits, want)


@pytest.mark.parametrize("name", ["gpt2", "llama_tied"])
@pytest.mark.parametrize("embedding_bits", [None, 4])
def test_tied_lm_head_exports_and_round_trips(tmp_path, name, embedding_bits):
    """GPT-2's lm_head shares wte's Parameter (and a tied Llama's embed_tokens'): with the embedding float the file
    holds its float table and lm_head's codes, both from that Parameter; with both quantized, both code sets."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from torchsaq.export.causal_lm import export_causal_lm
    from torchsaq.export.safetensors import load_exported

    def build():
        model = gpt2() if name == "gpt2" else llama(tie=True)
        saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=None, group_size=32, embedding_bits=embedding_bits))
        return model

    model = _trained(build(), _batch())
    emb = model.get_input_embeddings()
    assert model.lm_head.weight is emb.weight
    assert isinstance(emb, saq.QuantEmbedding) == (embedding_bits is not None)
    batch = _batch(1)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"]).logits
    saq.export(model, tmp_path / "m.safetensors")
    fresh = build()
    load_exported(tmp_path / "m.safetensors", fresh)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(input_ids=batch["input_ids"]).logits, want)
    assert (fresh.lm_head.weight is fresh.get_input_embeddings().weight) == (embedding_bits is None)
    export_causal_lm(model, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = sess.run(None, {"input_ids": batch["input_ids"].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
