"""saq.export / saq.load_exported: integer round trip, file format, size, errors, atomic writes."""
import json
import math
import os
import struct

import pytest
import safetensors.torch
import torch
from torch import nn

import torchsaq as saq
from torchsaq.export.safetensors import pack_codes, unpack_codes


def cnn(width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 6, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


def conv1d_net():
    return nn.Sequential(nn.Conv1d(2, 6, 5, padding=2), nn.BatchNorm1d(6), nn.ReLU(),
                         nn.Conv1d(6, 6, 3, groups=2), nn.BatchNorm1d(6), nn.ReLU(),
                         nn.Conv1d(6, 4, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3))


class TinyViT(nn.Module):
    """Linear patch embedding on tokens, a pre-norm MLP block with a residual, a linear head."""

    def __init__(self, dim=12):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):  # x: (B, T, 6)
        h = self.embed(x)
        h = h + self.fc2(nn.functional.gelu(self.fc1(self.norm(h))))
        return self.head(self.norm2(h).mean(dim=1))


NETS = {"cnn": (cnn, (4, 3, 8, 8)), "conv1d": (conv1d_net, (4, 2, 16)), "vit": (TinyViT, (4, 5, 6))}


def trained(name, bits, per_channel, ws):
    """A converted model after one SGD step (steps and BN statistics moved away from their init)."""
    factory, shape = NETS[name]
    model = factory()
    cfg = saq.QuantConfig(w_bits=bits, a_bits=4, per_channel=per_channel, weight_standardize=ws)
    saq.quantize(model, cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(shape)).square().mean().backward()
        opt.step()
    return model.eval(), cfg, shape


def fresh(name, cfg):
    torch.manual_seed(1234)  # different float weights than the exported model
    return saq.quantize(NETS[name][0](), cfg)


def read_header(path):
    """Parse a safetensors file by hand: 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return header, len(data) - 8 - n


@pytest.mark.parametrize("ws", [False, True])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("name", list(NETS))
def test_round_trip_outputs_equal(tmp_path, name, bits, per_channel, ws):
    model, cfg, shape = trained(name, bits, per_channel, ws)
    x = torch.randn(shape) * 2
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "model.safetensors"
    info = saq.export(model, path)
    assert info.file_bytes == os.path.getsize(path)

    # the fresh model may be converted with other settings: the file's metadata is authoritative
    other = saq.QuantConfig(w_bits=8, a_bits=8, per_channel=not per_channel, weight_standardize=not ws)
    loaded = fresh(name, other)
    saq.load_exported(path, loaded)
    loaded.eval()
    with torch.no_grad():
        out = loaded(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(saq.quant_layers(model), saq.quant_layers(loaded)):
        assert (a.w_bits, a.a_bits, a.quant_role) == (b.w_bits, b.a_bits, b.quant_role), n
        assert a.act_quantizer.signed == b.act_quantizer.signed
        assert b.weight_standardize is False
        torch.testing.assert_close(b.weight_quantizer.step, a.weight_quantizer.step, rtol=0, atol=0)
        # the loaded weight is already on the grid: Q(w) = w
        torch.testing.assert_close(b.quantized_weight(), b.weight, rtol=0, atol=0)
    assert saq.quant.convert.is_traced(loaded)
    # the model really is low-bit: the layers at `bits` carry at most 2^bits distinct weight values
    mid = [m for _, m in saq.quant_layers(loaded) if m.quant_role is None]
    assert mid and all(m.weight.unique().numel() <= (2**bits) * m.weight.shape[0] for m in mid)


def test_file_is_plain_safetensors_and_packed(tmp_path):
    model, _, _ = trained("cnn", 2, True, False)
    path = tmp_path / "m.safetensors"
    saq.export(model, path)
    header, data_bytes = read_header(path)
    meta = header.pop("__metadata__")
    assert meta["format"] == "saq-export"
    layers = json.loads(meta["layers"])
    assert set(layers) == {"0", "3", "6", "10"}
    # data offsets tile the data section exactly: nothing else (no pickle) is in the file
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == data_bytes
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for name, info in layers.items():
        n = math.prod(info["shape"])
        entry = header[f"{name}.weight_codes"]
        assert f"{name}.weight" not in header
        if info["w_bits"] == 2:  # four codes per byte
            assert entry["dtype"] == "U8" and entry["shape"] == [math.ceil(n / 4)]
        else:  # first/last at 8 bits: one int8 per weight
            assert info["w_bits"] == 8 and entry["dtype"] == "I8" and entry["shape"] == [n]
        assert header[f"{name}.weight_quantizer.step"]["dtype"] == "F32"
    assert header["1.running_var"]["dtype"] == "F32"  # BN kept in float
    assert header["0.bias"]["dtype"] == "F32"


@pytest.mark.parametrize("bits,slot", [(2, 2), (3, 3), (4, 4), (5, 8), (8, 8)])
def test_packed_size_is_bits_over_8_of_int8(tmp_path, bits, slot):
    model, _, _ = trained("cnn", 4, True, False)
    mid = model[3]
    int8_bytes = mid.weight.numel()  # one byte per weight in an int8 container
    for signed in (True, False):
        qn, qp = saq.qrange(bits, signed)
        codes = torch.randint(qn, qp + 1, (mid.weight.numel() + 3,))  # odd count: padding exercised
        packed = pack_codes(codes, bits, signed)
        assert packed.dtype in (torch.uint8, torch.int8)
        assert packed.numel() == math.ceil(codes.numel() * slot / 8)  # 3 bits: eight codes in three bytes
        assert torch.equal(unpack_codes(packed, bits, signed, codes.numel()).long(), codes)
    saq.export(model, tmp_path / "m.safetensors")
    header, _ = read_header(tmp_path / "m.safetensors")
    start, end = header["3.weight_codes"]["data_offsets"]
    assert end - start == math.ceil(int8_bytes / 2)  # 4-bit: half the int8 size


def test_export_smaller_than_float(tmp_path):
    model, _, _ = trained("cnn", 2, False, False)
    model2 = saq.quantize(cnn(64), saq.QuantConfig(w_bits=2, a_bits=2))
    saq.calibrate(model2, [torch.randn(2, 3, 8, 8)])
    info = saq.export(model2, tmp_path / "big.safetensors")
    float_bytes = 4 * sum(v.numel() for k, v in cnn(64).state_dict().items() if v.is_floating_point()) + \
        8 * sum(v.numel() for v in cnn(64).state_dict().values() if not v.is_floating_point())
    assert info.float_bytes == float_bytes
    assert info.ratio > 5  # mostly 2-bit weights; first/last at 8 bits, metadata, BN, steps
    assert "smaller" in str(info)


def test_three_bit_codes_take_three_bits(tmp_path):
    model, _, _ = trained("cnn", 3, True, False)
    saq.export(model, tmp_path / "m.safetensors")
    header, _ = read_header(tmp_path / "m.safetensors")
    layers = json.loads(header["__metadata__"]["layers"])
    assert header["__metadata__"]["version"] == "2"
    n = model[3].weight.numel()  # 8 x 8 x 3 x 3 = 576 codes: 216 bytes (a nibble each: 288)
    assert layers["3"]["packing"] == "3-bit" and header["3.weight_codes"]["shape"] == [math.ceil(n * 3 / 8)]


def _as_version_1(path, out):
    """Rewrite a version-2 export as the first format: 3-bit codes in nibbles, version "1", re-hashed."""
    from torchsaq.export.safetensors import _digest, _pack

    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    layers = json.loads(meta["layers"])
    for name, info in layers.items():
        if info["w_bits"] == 3:
            codes = unpack_codes(tensors[name + ".weight_codes"], 3, True, info["numel"])
            tensors[name + ".weight_codes"] = _pack(codes, -4, 4)
            info["packing"] = "nibble"
    meta.update(version="1", layers=json.dumps(layers))
    meta["sha256"] = _digest(tensors, meta)
    safetensors.torch.save_file(tensors, str(out), metadata=meta)
    return out


def test_version_1_files_still_load_and_newer_ones_are_refused(tmp_path):
    model, cfg, shape = trained("cnn", 3, True, False)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
    saq.export(model, tmp_path / "v2.safetensors")
    old = _as_version_1(tmp_path / "v2.safetensors", tmp_path / "v1.safetensors")
    header, _ = read_header(old)
    assert header["3.weight_codes"]["shape"] == [math.ceil(model[3].weight.numel() / 2)]
    loaded = saq.load_exported(old, fresh("cnn", cfg)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
    tensors = safetensors.torch.load_file(str(old))
    meta = {**read_header(old)[0]["__metadata__"], "version": "3"}
    from torchsaq.export.safetensors import _digest

    meta["sha256"] = _digest(tensors, meta)
    safetensors.torch.save_file(tensors, str(tmp_path / "v3.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="version '3'.*reads versions 1, 2"):
        saq.load_exported(tmp_path / "v3.safetensors", fresh("cnn", cfg))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="range"):
        pack_codes(torch.tensor([0, 4]), 3, True)
    with pytest.raises(ValueError, match="32"):
        pack_codes(torch.tensor([0]), 32, True)


def test_errors_on_mismatched_architecture(tmp_path):
    model, cfg, _ = trained("cnn", 4, True, False)
    path = tmp_path / "m.safetensors"
    saq.export(model, path)
    with pytest.raises(ValueError, match="shape"):
        saq.load_exported(path, saq.quantize(cnn(width=16), cfg))
    extra = nn.Sequential(*cnn(), nn.Linear(5, 5))
    with pytest.raises(ValueError, match="architecture mismatch"):
        saq.load_exported(path, saq.quantize(extra, cfg))
    fewer = cnn()
    fewer[10] = nn.Identity()
    with pytest.raises(ValueError, match="architecture mismatch"):
        saq.load_exported(path, saq.quantize(fewer, cfg))
    no_bn_bias = cnn()
    no_bn_bias[1] = nn.BatchNorm2d(8, affine=False)  # same layers, other state_dict keys
    with pytest.raises(ValueError, match="architecture mismatch"):
        saq.load_exported(path, saq.quantize(no_bn_bias, cfg))
    with pytest.raises(ValueError, match="quantize"):
        saq.load_exported(path, cnn())
    excluded = saq.quantize(cnn(), saq.QuantConfig(exclude=("6",)))
    with pytest.raises(ValueError, match="architecture mismatch"):
        saq.load_exported(path, excluded)


def test_errors_on_bad_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(ValueError, match="not a torchsaq export"):
        saq.load_exported(plain, saq.quantize(cnn()))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors"):
        saq.load_exported(junk, saq.quantize(cnn()))
    with pytest.raises(ValueError, match="no such file"):
        saq.load_exported(tmp_path / "missing.safetensors", saq.quantize(cnn()))


def test_errors_on_unready_model(tmp_path):
    with pytest.raises(ValueError, match="no quantized layer"):
        saq.export(cnn(), tmp_path / "a.safetensors")
    model = saq.quantize(cnn())
    with pytest.raises(ValueError, match="not run"):
        saq.export(model, tmp_path / "a.safetensors")
    saq.quant.convert.trace(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="not initialised"):
        saq.export(model, tmp_path / "a.safetensors")
    assert not any(tmp_path.iterdir())


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    model, _, _ = trained("cnn", 3, True, False)
    path = tmp_path / "m.safetensors"
    saq.export(model, path)
    previous = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        saq.export(model, path)
    assert path.read_bytes() == previous  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp file left
    monkeypatch.undo()
    new_path = tmp_path / "new.safetensors"
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        saq.export(model, new_path)
    assert not new_path.exists()


def test_export_keeps_float_layers_and_macs(tmp_path):
    cfg = saq.QuantConfig(w_bits=3, a_bits=3, first_last_bits=32)
    model = saq.quantize(cnn(), cfg)
    saq.calibrate(model, [torch.randn(2, 3, 8, 8)])
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    saq.export(model, tmp_path / "m.safetensors")
    header, _ = read_header(tmp_path / "m.safetensors")
    assert header["0.weight"]["dtype"] == "F32" and "0.weight_codes" not in header  # first layer at 32 bits
    loaded = saq.load_exported(tmp_path / "m.safetensors", fresh("cnn", cfg)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
    assert saq.bops(loaded) == saq.bops(model)  # MACs travel in the metadata


def test_callable_after_submodule_import(tmp_path):
    import torchsaq.export as _submodule  # noqa: F401  (binds saq.export to the submodule in some import orders)
    model, _, _ = trained("vit", 4, True, False)
    assert saq.export(model, tmp_path / "v.safetensors").file_bytes > 0


def test_export_info_says_larger_when_the_file_outweighs_the_float_model():
    from torchsaq.export.common import ExportInfo

    assert "4.00x smaller than the float32" in str(ExportInfo("m.safetensors", 1024, 4096, 3))
    assert "4.35x larger than the float32" in str(ExportInfo("m.safetensors", 4454, 1024, 1))
