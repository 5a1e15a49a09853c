"""Faults (issue 14): nothing lost, nothing silently wrong. Each test is one probe of the issue, run for real
where that is cheap: output folders, non-finite weights, config validation, export integrity."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from torchsaq.train.checkpoint import load_checkpoint
from torchsaq.cli import main
from torchsaq.train.config import TrainConfig, load_recipe
from torchsaq.train.runner import train

TINY = ["--epochs", "1", "--batch-size", "32", "--limit-train-batches", "2", "--limit-eval-batches", "1",
        "--sharpness", "none"]


def _fails(capsys, argv, *needles, code=None) -> str:
    """The CLI exits non-zero with one line 'torchsaq: error: ...' holding every needle, last on stderr (after the
    progress bar, if training started)."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors exit 2
        rc = e.code
    text = capsys.readouterr().err.strip()
    assert rc != 0 and (code is None or rc == code), (rc, text)
    err = text.split("\n")[-1]
    assert err.startswith("torchsaq: error: ") and text.count("torchsaq: error") == 1 and "Traceback" not in text, text
    for n in needles:
        assert n in err, err
    return err


def _ok(capsys, argv) -> str:
    """The CLI succeeds; returns its stdout (stderr, e.g. the progress bar, is dropped)."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    return captured.out


# -- configuration: one place, by type and range, for YAML and CLI alike ---------------------------------------
@pytest.mark.parametrize("text, field, value", [
    ("lr: 1e-2", "lr", float("1e-2")),                  # YAML 1.1 reads these as strings
    ("weight_decay: 5e-4", "weight_decay", float("5e-4")),
    ("adaptive: 'false'", "adaptive", False),
    ("save: 'false'", "save", False),
    ("per_channel: 'no'", "per_channel", False),
    ("per_channel: 'On'", "per_channel", True),
    ("epochs: '3'", "epochs", 3),
    ("epochs: 2.0", "epochs", 2),
    ("max_grad_norm: null", "max_grad_norm", None),
])
def test_yaml_values_are_read_as_their_field_type(tmp_path, text, field, value):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text + "\n")
    got = getattr(load_recipe(recipe), field)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text, needle", [
    ("step_gamma: -1", "step_gamma"),
    ("epochs: one", "epochs must be an integer"),
    ("epochs: 1.5", "epochs must be an integer"),
    ("step_milestones: 5", "step_milestones must be a list"),
    ("adaptive: maybe", "adaptive must be true or false"),
    ("lr: .inf", "lr must be a finite number"),
    ("lr: .nan", "lr must be a finite number"),
    ("weight_decay: nan", "weight_decay must be a finite number"),
    ("momentum: 1.5", "momentum"),
    ("epochs: null", "epochs must not be null"),
    ("model: 3", "model must be a string"),
    ("model_kwargs: [1, 2]", "model_kwargs must be a mapping"),
    ("lr: [0.1\nepochs: 2", "not valid YAML"),
    ("- just\n- a list", "must be a YAML mapping"),
])
def test_bad_yaml_recipes_give_one_line_errors(tmp_path, capsys, text, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text + "\n")
    _fails(capsys, ["train", "--config", str(recipe), "--output", str(tmp_path / "run")], needle, code=1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--weight-decay", "nan"), ("--label-smoothing", "nan"),
                                         ("--max-grad-norm", "inf"), ("--rho", "-inf"), ("--epochs", "1.5")])
def test_non_finite_and_mistyped_flags_are_refused(tmp_path, capsys, flag, value):
    _fails(capsys, ["train", flag, value, "--output", str(tmp_path / "run")], flag.lstrip("-").replace("-", "_"),
           code=2)
    assert not (tmp_path / "run").exists()


def test_python_api_is_validated_the_same_way():
    assert TrainConfig(lr="1e-2", adaptive="false").lr == 0.01
    for bad in (dict(lr=math.inf), dict(weight_decay=math.nan), dict(step_gamma=-1.0), dict(epochs=True),
                dict(step_milestones=5), dict(label_smoothing=math.nan)):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


# -- tests and output folders ------------------------------------------------------------------------------
@pytest.mark.slow
def test_errors_do_not_depend_on_a_run_left_in_the_current_folder(capsys):
    # the README's order: `torchsaq train` (default output runs/saq in the current folder), then the tests
    _ok(capsys, ["train", *TINY])
    assert Path("runs/saq/checkpoint.pt").is_file()
    _fails(capsys, ["train", "--model", "resnet9000"], "unknown model")
    _fails(capsys, ["train", "--w-bits", "33"], "w-bits")
    _fails(capsys, ["train", "--rho", "-0.1"], "rho")
    _fails(capsys, ["train", "--lr", "-1"], "lr")
    _fails(capsys, ["train", "--dataset", "mnist2d"], "unknown data set")
    _fails(capsys, ["eval", "missing.pt"], "not found")


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_a_run_is_never_reused_silently(tmp_path, capsys):
    out = tmp_path / "run"
    _ok(capsys, ["train", *TINY, "--output", str(out)])
    before = _snapshot(out)
    _fails(capsys, ["train", *TINY, "--seed", "1", "--output", str(out)], "already holds a run", "--overwrite",
           code=1)
    assert _snapshot(out) == before  # nothing written, nothing replaced
    # --overwrite deletes the old run first: a new run that dies before its first save leaves no mix
    cfg = TrainConfig(epochs=1, batch_size=32, limit_train_batches=2, limit_eval_batches=1, sharpness="none",
                      seed=1, output=str(out), overwrite=True)

    def die(step):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, progress=False, step_callback=die)
    assert not (out / "checkpoint.pt").exists()
    assert not {n for n in before if n.startswith("tb/")} & set(_snapshot(out))  # run A's log is gone
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1
    assert train(cfg, progress=False)["epochs"] == 1
    assert load_checkpoint(out / "checkpoint.pt")["config"]["seed"] == 1
    # the stored config says what the run is, not how it was started: reused as a recipe it deletes nothing
    assert load_checkpoint(out / "checkpoint.pt")["config"]["overwrite"] is False
    assert yaml.safe_load((out / "config.yaml").read_text())["overwrite"] is False
    assert len(list((out / "tb").iterdir())) == 1  # one TensorBoard log: no other run's events mixed in
    # --resume and --overwrite contradict each other
    capsys.readouterr()
    _fails(capsys, ["train", "--resume", "--overwrite", "--output", str(out)], "exclude each other")


def test_a_folder_in_use_is_refused(tmp_path, capsys):
    from filelock import FileLock

    out = tmp_path / "run"
    _ok(capsys, ["train", *TINY, "--output", str(out)])
    before = _snapshot(out)
    with FileLock(str(out / ".saq.lock"), timeout=0):  # another process's run holds the folder
        _fails(capsys, ["train", *TINY, "--overwrite", "--output", str(out)], "in use", code=1)
        _fails(capsys, ["train", "--resume", "--output", str(out)], "in use", code=1)
    assert _snapshot(out) == before
    _ok(capsys, ["train", "--resume", "--output", str(out)])  # free again


@pytest.mark.slow
def test_two_concurrent_runs_into_one_folder(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torchsaq", "train", "--epochs", "1", "--batch-size", "32", "--sharpness", "none",
           "--limit-eval-batches", "1", "--output", str(out)]
    a = subprocess.Popen([*cmd, "--limit-train-batches", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    deadline = time.time() + 90
    while not (out / "config.yaml").exists() and a.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    a.send_signal(signal.SIGSTOP)  # run A is in the middle of its epoch while B starts
    try:
        b = subprocess.run([*cmd, "--limit-train-batches", "2", "--seed", "1", "--overwrite"], capture_output=True,
                           text=True, env=env, timeout=120)
    finally:
        a.send_signal(signal.SIGCONT)
    _, a_err = a.communicate(timeout=120)
    assert a.returncode == 0, a_err[-2000:]
    assert b.returncode == 1 and b.stderr.startswith("torchsaq: error: ") and b.stderr.count("\n") == 1, b.stderr
    assert "in use by another torchsaq train" in b.stderr, b.stderr
    # what is left is run A, consistently
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 0
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["config"]["seed"] == 0 and state["global_step"] == 100
    assert len(list((out / "tb").iterdir())) == 1


# -- non-finite weights and divergence: detected before any save or export ------------------------------------
def _poison_optimizer(monkeypatch, at_step: int, **group):
    """Set ``group`` (e.g. weight_decay=nan) on the base optimizer's decayed group after global step ``at_step``:
    a real fault inside the real loop, which config validation would otherwise refuse up front."""
    import torchsaq.train.runner as T

    box = {}
    real = T.build_optimizer

    def spy(model, cfg):
        box["opt"] = real(model, cfg)
        return box["opt"]

    monkeypatch.setattr(T, "build_optimizer", spy)

    def callback(step):
        if step == at_step:
            box["opt"].param_groups[0].update(group)

    return callback


def test_nan_from_the_last_step_of_an_epoch_is_not_saved(tmp_path, monkeypatch, capsys):
    # the probe: --weight-decay nan --limit-train-batches 1 (the only step's loss is finite, its update is not)
    import torchsaq.train.runner as T

    real = T.build_optimizer
    monkeypatch.setattr(T, "build_optimizer", lambda m, c: _with(real(m, c), weight_decay=math.nan))
    out = tmp_path / "run"
    _fails(capsys, ["train", *TINY, "--limit-train-batches", "1", "--output", str(out)], "non-finite",
           "nothing was saved",
           code=1)
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()
    monkeypatch.undo()
    # the same after a good epoch: the run stops, the good checkpoint stays as it was
    cb = _poison_optimizer(monkeypatch, 1, weight_decay=math.nan)
    cfg = TrainConfig(epochs=2, batch_size=32, limit_train_batches=1, limit_eval_batches=1, sharpness="none",
                      output=str(out), overwrite=True)
    with pytest.raises(FloatingPointError, match=r"non-finite .* epoch 1\) is kept"):
        train(cfg, progress=False, step_callback=cb)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def _with(opt, **group):
    opt.param_groups[0].update(group)
    return opt


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    # the probe: --lr 1e6 trained to loss 5.8e5, chance accuracy and negative LSQ steps with exit 0
    out = tmp_path / "lr"
    err = _fails(capsys, ["train", "--lr", "1e6", "--epochs", "1", "--batch-size", "32", "--limit-train-batches", "6",
                          "--limit-eval-batches", "1", "--output", str(out)], "diverged", code=1)
    assert "training loss" in err or "step size(s) <= 0" in err
    assert not (out / "checkpoint.pt").exists()
    # diverging in epoch 2 of a run: epoch 1's checkpoint is what is left
    cb = _poison_optimizer(monkeypatch, 3, lr=1e6)
    cfg = TrainConfig(epochs=2, batch_size=32, limit_train_batches=3, limit_eval_batches=1, output=str(tmp_path / "b"))
    with pytest.raises(FloatingPointError, match=r"diverged in epoch 2.*epoch 1\) is kept"):
        train(cfg, progress=False, step_callback=cb)
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state["epoch"] == 1 and min(v.min() for k, v in state["model"].items() if k.endswith(".step")) > 0


def test_export_refuses_non_finite_weights_and_dead_steps(tmp_path):
    import torchsaq as saq

    model = saq.create_model("cnn1d", 10)
    saq.quantize(model, saq.QuantConfig())
    x = torch.randn(8, 1, 40)
    saq.calibrate(model, [x])
    saq.export(model, tmp_path / "good.safetensors")
    with torch.no_grad():
        model.features[3].weight[0, 0, 0] = math.nan
    assert torch.isnan(model.eval()(x)).any()  # the source outputs NaN: an export must not hide that
    with pytest.raises(ValueError, match="non-finite"):
        saq.export(model, tmp_path / "nan.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors"]
    # a step an optimizer pushed below 0 is a dead channel, not a divergence: the export reproduces it exactly
    with torch.no_grad():
        model.features[3].weight[0, 0, 0] = 0.0
        model.features[3].weight_quantizer.step[0] = -868.0
    ref = model.eval()(x)
    saq.export(model, tmp_path / "dead.safetensors")
    fresh = saq.quantize(saq.create_model("cnn1d", 10), saq.QuantConfig())
    saq.load_exported(tmp_path / "dead.safetensors", fresh)
    assert torch.equal(fresh.eval()(x), ref)


def test_metrics_jsonl_is_valid_json_with_non_finite_values(tmp_path):
    from torchsaq.train.runlog import write_metrics as _write_metrics

    _write_metrics([{"epoch": 1, "train_loss": 0.5, "val_acc": math.nan, "val_loss": math.inf}],
                   tmp_path / "m.jsonl", tmp_path / "m.csv")

    def refuse(token):
        raise AssertionError(f"bare {token} in metrics.jsonl")

    (row,) = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert row == {"epoch": 1, "train_loss": 0.5, "val_acc": None, "val_loss": None}


def test_calibrate_refuses_a_nan_batch_and_leaves_the_steps(tmp_path):
    import torchsaq as saq

    model = saq.create_model("cnn1d", 10)
    saq.quantize(model, saq.QuantConfig())
    x = torch.randn(16, 1, 40)
    saq.calibrate(model, [x])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = x.clone()
    bad[3, 0, 7] = math.nan
    with pytest.raises(ValueError, match="non-finite step sizes"):
        saq.calibrate(model, [x, bad])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = saq.create_model("cnn1d", 10)
    saq.quantize(fresh, saq.QuantConfig())
    with pytest.raises(ValueError, match="non-finite step sizes"):
        saq.calibrate(fresh, [bad])
    assert not any(q.is_initialized for q in fresh.modules() if isinstance(q, saq.LSQQuantizer))


# -- export integrity ----------------------------------------------------------------------------------------
def test_export_never_overwrites_its_source(tmp_path, capsys):
    run = tmp_path / "run"
    _ok(capsys, ["train", *TINY, "--output", str(run)])
    ckpt = run / "checkpoint.pt"
    before = ckpt.read_bytes()
    _fails(capsys, ["export", str(ckpt), str(ckpt)], "overwrite its source", code=1)
    _fails(capsys, ["export", str(run), str(ckpt)], "overwrite its source", code=1)
    other = tmp_path / "other.pt"
    other.write_bytes(before)  # any file that is not an export, e.g. another run's checkpoint
    _fails(capsys, ["export", str(ckpt), str(other)], ".safetensors or .onnx", code=1)  # not an export's name
    other_st = tmp_path / "other.safetensors"
    other_st.write_bytes(before)
    _fails(capsys, ["export", str(ckpt), str(other_st)], "not a torchsaq export", code=1)
    assert other_st.read_bytes() == before
    _fails(capsys, ["export", str(ckpt), str(tmp_path)], "is a folder", code=1)
    assert ckpt.read_bytes() == before and other.read_bytes() == before
    load_checkpoint(ckpt)
    out = tmp_path / "m.safetensors"
    assert re.search(r"x (smaller|larger) than the float32 state dict", _ok(capsys, ["export", str(ckpt), str(out)]))
    _ok(capsys, ["export", str(ckpt), str(out)])  # an earlier export may be replaced


def _exported(tmp_path):
    import torchsaq as saq

    model = saq.create_model("cnn1d", 10)
    saq.quantize(model, saq.QuantConfig(w_bits=4, a_bits=4))
    saq.calibrate(model, [torch.randn(32, 1, 40)])
    path = tmp_path / "m.safetensors"
    saq.export(model, path)
    return model.eval(), path


def _read(path):
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _write(path, tensors, metadata, resign):
    """Write an edited export; ``resign`` recomputes the content hash (a careful editor, or a bug)."""
    import safetensors.torch

    from torchsaq.export.safetensors import _digest

    if resign:
        metadata = {**metadata, "sha256": _digest(tensors, metadata)}
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def _edit_layer(path, layer, resign, **changes):
    tensors, meta = _read(path)
    layers = json.loads(meta["layers"])
    for k, v in changes.items():
        if v is KeyError:
            del layers[layer][k]
        else:
            layers[layer][k] = v
    return _write(path.with_name(f"edit_{layer}_{'_'.join(changes)}_{resign}.safetensors"), tensors,
                  {**meta, "layers": json.dumps(layers)}, resign)


def _fresh_model():
    import torchsaq as saq

    torch.manual_seed(99)
    m = saq.create_model("cnn1d", 10)
    saq.quantize(m, saq.QuantConfig(w_bits=4, a_bits=4))
    saq.calibrate(m, [torch.randn(8, 1, 40)])
    return m


def _model_state(m):
    import torchsaq as saq

    return ({k: v.clone() for k, v in m.state_dict().items()},
            [(n, layer.w_bits, layer.a_bits, layer.weight_quantizer.signed, layer.act_quantizer.signed,
              layer.quant_role, layer.weight_standardize, layer.weight_quantizer.step.shape)
             for n, layer in saq.quant_layers(m)])


def _assert_unchanged(m, before):
    state, layers = _model_state(m)
    assert layers == before[1]
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)


@pytest.mark.parametrize("changes", [dict(w_bits=3), dict(w_bits=2), dict(a_bits=2), dict(w_signed=False),
                                     dict(a_signed=True), dict(w_bits=None)])
def test_edited_metadata_is_refused(tmp_path, changes):
    import torchsaq as saq

    _, path = _exported(tmp_path)
    edited = _edit_layer(path, "features.3", False, **changes)
    model = _fresh_model()
    before = _model_state(model)
    with pytest.raises(ValueError, match="does not match its content hash"):
        saq.load_exported(edited, model)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("changes, needle", [
    (dict(w_bits=3), "do not fit"),  # 3-bit codes take 3 bits, not a nibble
    (dict(w_bits=2), "do not fit"),
    (dict(w_bits=None), "'w_bits' is None"),
    (dict(a_signed=KeyError), "'a_signed' is missing"),
    (dict(shape=[16, 16, "3"]), "'shape'"),
    (dict(numel=7), "'numel'"),
])
def test_codes_and_metadata_that_do_not_fit_are_refused_even_when_rehashed(tmp_path, changes, needle):
    import torchsaq as saq

    _, path = _exported(tmp_path)
    edited = _edit_layer(path, "features.3", True, **changes)
    model = _fresh_model()
    before = _model_state(model)
    with pytest.raises(ValueError, match=needle) as e:
        saq.load_exported(edited, model)
    assert "\n" not in str(e.value)
    _assert_unchanged(model, before)


def test_codes_outside_a_narrower_declared_width_are_refused(tmp_path):
    import torchsaq as saq

    _, path = _exported(tmp_path)
    edited = _edit_layer(path, "features.0", True, w_bits=5)  # the 8-bit first layer's int8 codes, called 5-bit
    model = _fresh_model()
    before = _model_state(model)
    with pytest.raises(ValueError, match="codes outside the declared 5-bit signed range"):
        saq.load_exported(edited, model)
    _assert_unchanged(model, before)


def test_a_failing_load_leaves_the_model_untouched(tmp_path):
    import torchsaq as saq

    source, path = _exported(tmp_path)
    tensors, meta = _read(path)
    tensors["fc.weight_codes"] = tensors["fc.weight_codes"][:-1]  # the last layer's codes cut short
    bad = _write(tmp_path / "cut.safetensors", tensors, meta, resign=True)
    model = _fresh_model()
    before = _model_state(model)
    with pytest.raises(ValueError, match="fc"):
        saq.load_exported(bad, model)
    _assert_unchanged(model, before)
    tensors, meta = _read(path)
    tensors["features.0.weight_codes"][0] ^= 1  # one flipped bit in the data
    with pytest.raises(ValueError, match="content hash"):
        saq.load_exported(_write(tmp_path / "flip.safetensors", tensors, meta, resign=False), model)
    del meta["sha256"]
    with pytest.raises(ValueError, match="no content hash"):
        saq.load_exported(_write(tmp_path / "old.safetensors", tensors, meta, resign=False), model)
    _assert_unchanged(model, before)
    # and the intact file still loads into that model and reproduces the source
    saq.load_exported(path, model)
    x = torch.randn(4, 1, 40)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source(x))


class _Thing:
    pass


def test_a_non_checkpoint_file_error_suggests_nothing_unsafe(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"format": "saq-checkpoint", "model": _Thing()}, path)
    with pytest.raises(ValueError, match="not a torchsaq checkpoint") as e:
        load_checkpoint(path)
    assert "weights_only" not in str(e.value) and "trust" not in str(e.value) and "\n" not in str(e.value)


# -- the file system and the data: one-line errors, nothing earlier lost ---------------------------------------
def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a path under a regular file cannot be created, also as root
    _fails(capsys, ["train", *TINY, "--output", str(blocker / "run")], "cannot write to output folder", code=1)
    _fails(capsys, ["train", *TINY, "--output", str(blocker)], "is a file", code=1)
    assert blocker.read_text() == "not a folder"


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "run"
    saves = []
    real = torch.save

    def save(obj, f, *a, **k):  # the second checkpoint hits a full disk half-way
        saves.append(f)
        real(obj, f, *a, **k)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    _fails(capsys, ["train", *TINY, "--epochs", "2", "--output", str(out)], "No space left on device",
           "checkpoint.pt is unchanged", code=1)
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_one_line(tmp_path, capsys, workers):
    from PIL import Image

    data = tmp_path / "data"
    for split in ("train", "test"):
        for c, cls in enumerate(("a", "b")):
            (data / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (36, 36), (80 * c, 40 * i, 90)).save(data / split / cls / f"{i}.png")
    (data / "train" / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    _fails(capsys, ["train", "--dataset", "imagefolder", "--data-dir", str(data), "--model", "resnet20",
                    "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", str(workers),
                    "--output", str(tmp_path / "run")], "cannot identify image file", "3.png", code=1)


@pytest.mark.slow
def test_sharpness_output_folder_and_landscape_of_two_data_sets(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _ok(capsys, ["train", *TINY, "--output", str(a)])
    _ok(capsys, ["train", *TINY, "--dataset", "digits", "--model", "cnn_digits", "--output", str(b)])
    _fails(capsys, ["sharpness", str(a), "--num-samples", "8", "--iters", "1", "--output", str(tmp_path)],
           "is a folder", code=1)
    _fails(capsys, ["landscape", str(a), str(b), "--steps", "3", "--num-samples", "8",
                    "--output", str(tmp_path / "ls")], "different data sets", "mnist1d", "digits", code=1)
    assert not (tmp_path / "ls").exists()


# -- threads -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_threads_auto_is_one_for_small_models_and_can_be_set(tmp_path, capsys, monkeypatch):
    from torchsaq.train.runner import SMALL_BATCH_MACS, auto_threads

    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine (issue 21: load counts)
    cpu = torch.device("cpu")
    cores = len(os.sched_getaffinity(0))
    assert auto_threads(SMALL_BATCH_MACS / 2, cpu) == 1
    assert auto_threads(SMALL_BATCH_MACS * 2, cpu) == max(1, min(torch.get_num_threads(), cores))
    assert auto_threads(SMALL_BATCH_MACS * 2, cpu, local_world=cores) == 1  # DDP processes share the cores
    torch.set_num_threads(2)
    try:
        out = _ok(capsys, ["train", *TINY, "--no-save"])  # cnn1d, batch 32: 16 M MACs per batch
        assert "(cpu, 1 thread)" in out
        assert torch.get_num_threads() == 2  # the caller's setting comes back
        r = train(TrainConfig(epochs=1, batch_size=32, limit_train_batches=1, limit_eval_batches=1, save=False,
                              threads=2), progress=False)
        assert r["threads"] == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    _fails(capsys, ["train", "--threads", "-1"], "threads")


# -- smaller ones ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_with_more_epochs_extends_a_step_schedule_and_refuses_cosine(tmp_path, capsys):
    common = ["--batch-size", "32", "--limit-train-batches", "2", "--limit-eval-batches", "1", "--sharpness", "none"]
    cos = tmp_path / "cos"
    _ok(capsys, ["train", *common, "--epochs", "2", "--output", str(cos)])
    before = (cos / "checkpoint.pt").read_bytes()
    _fails(capsys, ["train", "--resume", "--epochs", "3", "--output", str(cos)], "cosine schedule", code=1)
    _fails(capsys, ["train", "--resume", "--epochs", "1", "--output", str(cos)], "already completed 2 epochs", code=1)
    assert (cos / "checkpoint.pt").read_bytes() == before
    # a step schedule continues exactly: 2 epochs + 1 more == 3 epochs straight
    step = [*common, "--lr-schedule", "step", "--step-milestones", "1", "2"]
    _ok(capsys, ["train", *step, "--epochs", "2", "--output", str(tmp_path / "a")])
    _ok(capsys, ["train", "--resume", "--epochs", "3", "--output", str(tmp_path / "a")])
    _ok(capsys, ["train", *step, "--epochs", "3", "--output", str(tmp_path / "b")])
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in "ab")
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"] == 6
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    from torchsaq._io import atomic_write_text

    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "f.txt", "x")
        reference = tmp_path / "ref.txt"
        reference.write_text("x")  # what a plain open() gives under this umask
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode == reference.stat().st_mode & 0o777


def test_size_reports_name_their_baselines(tmp_path, capsys):
    run = tmp_path / "run"
    out = _ok(capsys, ["train", *TINY, "--output", str(run)])
    assert "smaller than the float32 parameters" in out
    assert "float32 parameters:" in _ok(capsys, ["summary", str(run)])
    assert re.search(r"x (smaller|larger) than the float32 state dict",
                     _ok(capsys, ["export", str(run), str(tmp_path / "m.safetensors")]))


def test_readme_commands_use_runs_the_readme_creates_and_outputs_are_ignored():
    import re

    from torchsaq.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    block = re.search(r"## Command line\n\n```bash\n(.*?)```", (root / "README.md").read_text(), re.S).group(1)
    created = set()
    for line in block.splitlines():
        cmd = line.split("#")[0].split()
        if "train" in cmd and "--resume" not in cmd and "--config" not in cmd:  # a recipe names its own output
            created.add(cmd[cmd.index("--output") + 1] if "--output" in cmd else "runs/saq")
        for word in cmd:
            m = re.match(r"(runs/[^/]+)/", word)
            if m:
                assert m.group(1) in created, f"README uses {word} before any command creates it: {line}"
    assert build_parser().parse_args(["landscape", "x.pt"]).output.startswith("runs/")
    ignored = (root / ".gitignore").read_text().split()
    assert "runs/" in ignored and "*.safetensors" in ignored


def test_a_step_pushed_below_zero_is_kept_positive_not_a_warning(tmp_path, monkeypatch, capsys):
    """An 8-bit first layer's per-channel step can reach <= 0 at ordinary learning rates (seen in the MNIST-1D
    benchmark and a fresh clone's default run): the next optimizer step projects it back to the smallest step
    (issue 21: the run does not warn); the run goes on and saves."""
    import torchsaq.train.runner as T

    box = {}
    real = T.build_optimizer

    def spy(model, cfg):
        box["model"] = model
        return real(model, cfg)

    monkeypatch.setattr(T, "build_optimizer", spy)

    def callback(step):
        if step == 2:
            with torch.no_grad():
                box["model"].features[0].weight_quantizer.step[0] = -0.1

    cfg = TrainConfig(epochs=2, batch_size=32, limit_train_batches=3, limit_eval_batches=1, output=str(tmp_path / "r"))
    res = T.train(cfg, progress=False, step_callback=callback)
    err = capsys.readouterr().err
    assert "step size <= 0" not in err and "warning" not in err
    assert float(box["model"].features[0].weight_quantizer.step.detach().min()) > 0
    assert res["epochs"] == 2 and (tmp_path / "r" / "checkpoint.pt").exists()
