"""From a run to a model, and from a file to a number: ``saq.load_trained``, ``torchsaq export --onnx-mode`` and
``torchsaq eval model.onnx``, as a user types them (MNIST-1D, the embedded data set)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import torchsaq as saq  # noqa: E402
from torchsaq.cli import main  # noqa: E402
from torchsaq.export.onnx import onnx_layers, onnx_metadata  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short MNIST-1D run (1-D CNN, w4a4): its folder."""
    out = tmp_path_factory.mktemp("onnx_cli") / "run"
    assert main(["train", "--epochs", "1", "--sharpness", "none", "--output", str(out), "--batch-size", "32",
                 "--limit-train-batches", "2", "--limit-eval-batches", "1",
                 "--model-kwargs", "{channels: [8, 8]}"]) == 0
    return out


def torchsaq(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torchsaq", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_load_trained_gives_the_runs_model(run):
    model = saq.load_trained(run)  # the folder, or its checkpoint.pt
    again, cfg, info = saq.checkpoint.load_model(run / "checkpoint.pt")
    assert not model.training and model.saq_run["dataset"] == "mnist1d" == cfg.dataset
    assert [n for n, _ in saq.quant_layers(model)] == [n for n, _ in saq.quant_layers(again)]
    x = torch.randn(16, *info["input_shape"])
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    with pytest.raises(ValueError, match="checkpoint not found"):
        saq.load_trained(run / "nothing")


@pytest.mark.slow
def test_export_fast_then_eval_the_file(run, tmp_path):
    path = tmp_path / "model.onnx"
    p = torchsaq("export", str(run), str(path), "--onnx-mode", "fast")
    assert p.returncode == 0, p.stderr[-2000:]
    meta = onnx_metadata(path)
    assert meta["saq_onnx_mode"] == "fast" and meta["saq_dataset"] == "mnist1d"
    assert {r["kernel"] for r in onnx_layers(path).values()} == {"ConvInteger", "MatMulInteger"}
    p = torchsaq("eval", str(path), "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["onnx_mode"] == "fast" and result["run"] == str((run / "checkpoint.pt").resolve())
    assert result["onnx_samples"] == result["pytorch_samples"] == 1000
    # the deployed file scores what the PyTorch model scores (the same outputs up to float rounding)
    assert result["onnx_top1"] == result["pytorch_top1"] and result["onnx_top5"] == result["pytorch_top5"]
    assert abs(result["onnx_loss"] - result["pytorch_loss"]) < 1e-4
    # independently: the file in a default session against the model on the test split's first batch
    from torchsaq.train.data import build_datasets

    x = torch.stack([build_datasets("mnist1d").test[i][0] for i in range(64)])
    with torch.no_grad():
        ref = saq.load_trained(run)(x).numpy()
    out = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    assert np.median(np.abs(out - ref).max(1) / np.abs(ref).max(1)) < 1e-5


def test_eval_onnx_without_its_run(run, tmp_path, capsys):
    path = tmp_path / "model.onnx"
    assert main(["export", str(run), str(path)]) == 0  # compact
    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if p.key not in ("saq_checkpoint", "saq_dataset")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    onnx.save(proto, str(path))
    capsys.readouterr()
    assert main(["eval", str(path)]) == 1
    assert "give --dataset NAME or --run RUN" in capsys.readouterr().err
    assert main(["eval", str(path), "--dataset", "mnist1d"]) == 0  # the file alone, no PyTorch model
    out = capsys.readouterr().out
    assert "in onnxruntime" in out and "default session" in out and "PyTorch" not in out
    assert main(["eval", str(path), "--run", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "PyTorch model of" in out[1]
    top1 = [line.split("top-1 ")[1].split("%")[0] for line in out]
    assert top1[0] == top1[1]


def test_cli_errors(run, tmp_path, capsys):
    assert main(["export", str(run), str(tmp_path / "m.safetensors"), "--onnx-mode", "fast"]) == 1
    assert "--onnx-mode applies to .onnx files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(run), str(tmp_path / "m.onnx"), "--onnx-mode", "quick"])
    assert "invalid choice: 'quick'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.onnx")]) == 1
    assert "ONNX file not found" in capsys.readouterr().err
    assert main(["eval", str(run), "--dataset", "mnist1d"]) == 1
    assert "apply to a .onnx file" in capsys.readouterr().err
    model = saq.load_trained(run)
    with pytest.raises(ValueError, match="onnx_mode must be one of 'compact', 'fast', got 'quick'"):
        saq.export(model, tmp_path / "m.onnx", example_inputs=(torch.zeros(1, 1, 40),), onnx_mode="quick")
    assert not (tmp_path / "m.onnx").exists()
