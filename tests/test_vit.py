"""The Fashion-MNIST Vision Transformer (``vit_fmnist``, docs/vit.md): its shape, what quantization converts and at
which bits, what SAQ perturbs in it, and a `torchsaq train` step with AdamW at w4a4."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchsaq as saq
from torchsaq.train.checkpoint import load_checkpoint, load_model
from torchsaq.cli import main
from torchsaq.train.models import create_model, model_info

pytest.importorskip("timm")


def _quantized(**config) -> nn.Module:
    model = create_model("vit_fmnist", 10, in_chans=1)
    saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4, **config), example_inputs=torch.randn(1, 1, 28, 28))
    return model


def test_vit_fmnist_shape():
    info = model_info("vit_fmnist")
    assert info.input_shape == (1, 28, 28) and info.family == "fashion_mnist" and info.source == "timm"
    model = create_model("vit_fmnist", 10, in_chans=1)
    assert model.patch_embed.proj.kernel_size == (7, 7) and model.patch_embed.num_patches == 16
    assert model.pos_embed.shape == (1, 17, 64) and len(model.blocks) == 4 and model.blocks[0].attn.num_heads == 4
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    d, hidden, tokens = 64, 128, 17
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
    by_hand = (49 * d + d) + d + tokens * d + 4 * block + 2 * d + (d * 10 + 10)  # embed, cls, pos, blocks, norm, head
    assert sum(p.numel() for p in model.parameters()) == by_hand == 139_018
    wide = create_model("vit_fmnist", 10, in_chans=1, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    assert wide.patch_embed.num_patches == 49 and wide(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_vit_fmnist_quantizes_every_linear_at_4_bits_patch_embedding_and_head_at_8():
    model = _quantized()
    model(torch.randn(8, 1, 28, 28))  # the first quantized forward initialises the steps and signedness
    bits = {name: (m.w_bits, m.a_bits) for name, m in saq.quant_layers(model)}
    linears = [f"blocks.{i}.{s}" for i in range(4) for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert bits == {"patch_embed.proj": (8, 8), "head": (8, 8), **{n: (4, 4) for n in linears}}
    # the blocks' inputs (LayerNorm outputs, GELU outputs, attention outputs) can be negative: signed ranges
    signed = {name: m.act_quantizer.signed for name, m in saq.quant_layers(model) if name != "patch_embed.proj"}
    assert all(signed.values()), signed


def test_saq_perturbs_norms_biases_and_embeddings_unless_told_not_to():
    model = _quantized()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}

    def perturbed(opt: saq.SAQ) -> set[str]:
        return {names[id(p)] for p in opt._targets.tensors()}

    every = perturbed(saq.SAQ(model, base, mode="case3"))
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.norm1.bias", "head.bias"} <= every
    assert not any(n.endswith((".step", ".scale")) for n in every)  # no quantizer step by default
    only_weights = perturbed(saq.SAQ(model, base, mode="case3", perturb_unquantized=False))
    assert only_weights == {n + ".weight" for n, _ in saq.quant_layers(model)}
    # perturb_exclude: parameter-name globs left unperturbed (still trained by the base optimizer)
    no_embed = perturbed(saq.SAQ(model, base, mode="case3", perturb_exclude=("pos_embed", "cls_token")))
    assert no_embed == every - {"pos_embed", "cls_token"}
    no_norm = perturbed(saq.SAQ(model, base, mode="case3", perturb_exclude=["*norm*"]))
    assert no_norm == {n for n in every if "norm" not in n} and len(no_norm) == len(every) - 2 * (2 * 4 + 1)
    with pytest.raises(ValueError, match="perturb_exclude pattern 'pos_embedding' matches no parameter"):
        saq.SAQ(model, base, perturb_exclude=["pos_embedding"])
    cfg = saq.TrainConfig(sharpness="case3", perturb_exclude=["pos_embed", "cls_token"])
    assert cfg.saq_kwargs(10)["perturb_exclude"] == ("pos_embed", "cls_token")


@pytest.mark.slow  # ~3 s (8 s on a loaded machine): one epoch of 2 steps, full SAQ, and an evaluation
def test_cli_trains_vit_fmnist_at_w4a4_with_adamw(tmp_path):
    from test_data import _write_fmnist  # the four IDX files, random content

    data, out = tmp_path / "fmnist", tmp_path / "run"
    _write_fmnist(data, n_train=40, n_test=12)
    assert main(["train", "--dataset", "fashion_mnist", "--data-dir", str(data), "--model", "vit_fmnist",
                 "--optimizer", "adamw", "--w-bits", "4", "--a-bits", "4", "--lr", "1e-3", "--warmup-epochs", "0.5",
                 "--epochs", "1", "--batch-size", "16", "--sharpness", "case3", "--strategy", "full",
                 "--output", str(out)]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    cfg = state["config"]
    assert (cfg["model"], cfg["optimizer"], cfg["w_bits"], cfg["warmup_epochs"]) == ("vit_fmnist", "adamw", 4, 0.5)
    assert state["global_step"] == 2  # 40 images in full batches of 16
    model, _, _ = load_model(out / "checkpoint.pt")
    assert sorted((m.w_bits, m.a_bits) for _, m in saq.quant_layers(model)) == [(4, 4)] * 16 + [(8, 8)] * 2
