"""The `torchsaq` command line: train/eval/export/summary end to end, flags from TrainConfig, one-line errors."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import torchsaq as saq
from torchsaq.train.checkpoint import load_checkpoint, save_checkpoint
from torchsaq.cli import build_parser, config_from_args, main
from torchsaq.train.config import TrainConfig

FAST = ["--batch-size", "32", "--limit-train-batches", "3", "--limit-eval-batches", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One `torchsaq train` run shared by the eval/export/summary tests."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--epochs", "1", "--sharpness", "none", "--output", str(out), *FAST]) == 0
    return out


def _fails(capsys, argv, *needles) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("torchsaq: error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# -- train end to end ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_writes_checkpoint_metrics_and_plot(run_dir):
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["epoch"] == 1 and state["config"]["sharpness"] == "none"
    for name in ("metrics.jsonl", "metrics.csv", "curves.png", "config.yaml"):
        assert (run_dir / name).is_file(), name


def test_train_prints_accuracy_size_and_bops(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--sharpness", "none", "--no-save", *FAST]) == 0
    out = capsys.readouterr().out
    assert "test      top-1" in out and "top-5" in out and "MiB" in out and "BOPs" in out
    assert "checkpoint" not in out  # --no-save: nothing written, no paths to report
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_eval_matches_the_training_metrics(run_dir, capsys):
    # the full test set, evaluated from the checkpoint, against a hand-written loop over the same data
    assert main(["eval", str(run_dir / "checkpoint.pt"), "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    model, _, _ = saq.checkpoint.load_model(run_dir / "checkpoint.pt")
    from torchsaq.train.data import build_datasets

    test = build_datasets("mnist1d").test
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([int(test[i][1]) for i in range(len(test))])
    with torch.no_grad():
        logits = model(x).double()
    assert got["samples"] == 1000
    assert got["top1"] == pytest.approx(100 * (logits.argmax(1) == y).double().mean().item(), abs=1e-9)
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-4)
    # and the directory form of the argument works too
    assert main(["eval", str(run_dir)]) == 0
    assert "top-1" in capsys.readouterr().out


@pytest.mark.slow
def test_export_and_summary(run_dir, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run_dir / "checkpoint.pt"), str(out)]) == 0
    assert out.is_file() and re.search(r"x (smaller|larger) than the float32", capsys.readouterr().out)
    model, _, _ = saq.checkpoint.load_model(run_dir / "checkpoint.pt")
    fresh = saq.create_model("cnn1d", 10)
    saq.quantize(fresh, saq.QuantConfig(w_bits=4, a_bits=4), example_inputs=torch.zeros(1, 1, 40))
    saq.load_exported(out, fresh)
    x = torch.randn(4, 1, 40)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), model(x), atol=1e-5)
    assert main(["summary", str(run_dir / "checkpoint.pt")]) == 0
    text = capsys.readouterr().out
    assert "features.0" in text and "fc" in text and "BOPs" in text and "MiB" in text


# -- flags come from TrainConfig ---------------------------------------------------------------------------
def test_every_config_field_has_a_flag_and_only_given_flags_override(tmp_path):
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    flags = {opt for a in train_parser._actions for opt in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name
        if f.type in ("bool", bool):
            assert "--no-" + f.name.replace("_", "-") in flags, f.name
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nlr: 0.2\nmodel: cnn1d\nsharpness: case1\nstep_milestones: [2, 4]\n")
    args = parser.parse_args(["train", "--config", str(recipe), "--lr", "0.01", "--no-per-channel",
                              "--model-kwargs", "{channels: [8, 8]}"])
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.lr, cfg.sharpness, cfg.per_channel) == (7, 0.01, "case1", False)
    assert cfg.step_milestones == [2, 4] and cfg.model_kwargs == {"channels": [8, 8]}
    assert cfg.rho == TrainConfig().rho  # not given anywhere: the default
    assert config_from_args(parser.parse_args(["train"])) == TrainConfig()


# -- one-line errors --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_input_gives_one_line_errors(tmp_path, capsys, run_dir):
    _fails(capsys, ["train", "--model", "resnet9000"], "unknown model")
    _fails(capsys, ["train", "--w-bits", "33"], "w-bits")
    _fails(capsys, ["train", "--rho", "-0.1"], "rho")
    _fails(capsys, ["train", "--lr", "-1"], "lr")
    _fails(capsys, ["train", "--dataset", "mnist2d"], "unknown data set")
    _fails(capsys, ["eval", str(tmp_path / "missing.pt")], "not found")
    _fails(capsys, ["train", "--config", str(tmp_path / "nope.yaml")], "recipe file not found")
    # a checkpoint of another architecture, as --pretrained and as a checkpoint claiming another model
    _fails(capsys, ["train", "--model", "cnn_digits", "--dataset", "digits", "--pretrained",
                    str(run_dir / "checkpoint.pt"), "--output", str(tmp_path / "x")], "does not match")
    state = load_checkpoint(run_dir / "checkpoint.pt")
    state["config"]["model_kwargs"] = {"channels": [8, 8]}
    other = save_checkpoint(tmp_path / "other.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    _fails(capsys, ["summary", str(other)], "does not match the model architecture")
    # argparse errors: one line as well, exit status 2
    with pytest.raises(SystemExit) as e:
        main(["train", "--sharpness", "case9"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("torchsaq: error: ") and "\n" not in err and "case9" in err


# -- Ctrl-C in a real process, then --resume ---------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_saves_exits_cleanly_and_resume_finishes(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torchsaq", "train", "--epochs", "3", "--sharpness", "none", "--batch-size", "32",
           "--limit-train-batches", "40", "--limit-eval-batches", "2", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 90
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "torchsaq train --resume --output" in stderr
    state = load_checkpoint(ckpt)
    assert state["epoch"] >= 1 and state["global_step"] == 40 * state["epoch"] + state["step_in_epoch"]
    # --resume takes the stored options; only the given flags change
    assert main(["train", "--resume", "--output", str(out)]) == 0
    assert "3 epochs" in capsys.readouterr().out
    final = load_checkpoint(ckpt)
    assert final["epoch"] == 3 and final["global_step"] == 120 and final["config"]["limit_train_batches"] == 40


@pytest.mark.slow
def test_landscape_and_sharpness_delegate_to_analysis(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "checkpoint.pt")
    assert main(["landscape", ckpt, ckpt, "--steps", "3", "--num-samples", "32", "--output", str(tmp_path / "ls")]) == 0
    lines = capsys.readouterr().out.splitlines()
    plot = Path(next(line.split()[-1] for line in lines if line.startswith("plot")))
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"
    out = tmp_path / "sharp.json"
    assert main(["sharpness", ckpt, "--num-samples", "32", "--iters", "2", "--rho", "0.1", "--output", str(out)]) == 0
    assert "hessian_top_eigenvalue" in capsys.readouterr().out
    row = json.loads(out.read_text())
    assert row["rho"] == 0.1 and row["num_samples"] == 32 and row["sam_sharpness"] >= 0


def test_layer_bits_and_exclude_from_flags_and_yaml(tmp_path, capsys):
    """Mixed precision from the command line and from a recipe: the trained checkpoint has those bits."""
    from torchsaq.quant.layers import quant_layers
    from torchsaq.train.runner import build_model

    recipe = tmp_path / "mixed.yaml"
    recipe.write_text("w_bits: 2\na_bits: 2\nlayer_bits: {'features.3': [4, 8]}\nexclude: [features.6]\n")
    out_flags, out_yaml = tmp_path / "flags", tmp_path / "yaml"
    assert main(["train", "--epochs", "1", "--w-bits", "2", "--a-bits", "2", "--layer-bits", "{features.3: [4, 8]}",
                 "--exclude", "features.6", "--output", str(out_flags), *FAST]) == 0
    assert main(["train", "--config", str(recipe), "--epochs", "1", "--output", str(out_yaml), *FAST]) == 0
    for out in (out_flags, out_yaml):
        state = load_checkpoint(out / "checkpoint.pt")
        cfg = TrainConfig.from_dict(state["config"])
        assert cfg.layer_bits == {"features.3": [4, 8]} and cfg.exclude == ["features.6"]
        model = build_model(cfg, in_chans=1, num_classes=10)
        bits = {n: (m.w_bits, m.a_bits) for n, m in quant_layers(model)}
        assert bits["features.3"] == (4, 8) and "features.6" not in bits
        assert bits["features.9"] == (2, 2)
    # a pattern that matches nothing is a one-line error, before any training
    capsys.readouterr()
    _fails(capsys, ["train", "--exclude", "nothing.here", "--output", str(tmp_path / "bad"), *FAST], "exclude")


# -- choices and help come from the registries (torchsaq.registry) ------------------------------------------
def _train_parser():
    return build_parser()._subparsers._group_actions[0].choices["train"]


def test_help_lists_every_registered_model_and_data_set_and_choices_come_from_the_registries():
    from torchsaq.optim.perturb import WHERE
    from torchsaq.train import config
    from torchsaq.train.data import list_datasets

    parser = _train_parser()
    text = " ".join(parser.format_help().split())
    model_help = next(a.help for a in parser._actions if a.dest == "model")
    for name in saq.list_models():  # preresnet20/32/56 included
        assert f" {name}," in model_help or f" {name};" in model_help, name
    for name in list_datasets():
        assert f"{name} (model " in text, name
    choices = {a.dest: tuple(a.choices) for a in parser._actions if a.choices}
    registries = {"sharpness": config.SHARPNESS, "strategy": config.STRATEGIES, "quantizer": config.QUANTIZERS,
                  "act_grad_scale": config.ACT_GRAD_SCALES, "a_mode": config.A_MODES, "optimizer": config.OPTIMIZERS,
                  "lr_schedule": config.SCHEDULES, "lsq_backend": config.LSQ_BACKENDS}
    assert choices == {dest: reg.names() for dest, reg in registries.items()}
    assert {"pact", "dorefa"} <= set(choices["quantizer"])
    for registry in registries.values():
        for name, description in registry.help().items():
            assert f"{name}: {description}" in text, name
    landscape = build_parser()._subparsers._group_actions[0].choices["landscape"]
    where = next(a for a in landscape._actions if a.dest == "where")
    assert tuple(where.choices) == WHERE.names()
    assert build_parser().parse_args(["landscape", "x.pt", "--where", "float"]).where == "latent"


def test_every_vocabulary_is_defined_once():
    """The names each option accepts: one Registry each; a module that exposes one under the same name exposes the
    same object (no copy), and torchsaq.vocab's tuples are views of them."""
    import importlib
    import pkgutil

    from torchsaq import vocab
    from torchsaq.registry import Registry
    from torchsaq.train import config

    assert config.SHARPNESS.names() == ("none", *config.MODES.names())
    same = {"MODES": config.MODES, "STRATEGIES": config.STRATEGIES, "QUANTIZERS": config.QUANTIZERS,
            "ACT_GRAD_SCALES": config.ACT_GRAD_SCALES, "SHARPNESS": config.SHARPNESS, "OPTIMIZERS": config.OPTIMIZERS,
            "SCHEDULES": config.SCHEDULES, "LSQ_BACKENDS": config.LSQ_BACKENDS, "WHERE": saq.analysis.WHERE}
    for name, registry in same.items():
        assert getattr(vocab, name) == registry.names(), name
    for info in pkgutil.walk_packages(saq.__path__, "torchsaq."):
        if info.name.endswith(("_triton_lsq", ".vocab")):
            continue
        module = importlib.import_module(info.name)
        for name, expected in same.items():
            value = getattr(module, name, None)
            if isinstance(value, (tuple, list, Registry)):
                assert value is expected, f"{info.name}.{name}"
