"""Faults (issue 14): nothing lost, nothing silently wrong. Each test is one probe of the issue, run for real
where that is cheap: output folders, non-finite weights, config validation, export integrity."""
from __future__ import annotations

import math

import pytest

from saq.cli import main
from saq.config import TrainConfig, load_recipe


def _fails(capsys, argv, *needles, code=None) -> str:
    """The CLI exits non-zero with exactly one line 'saq: error: ...' on stderr holding every needle."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors exit 2
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc != 0 and (code is None or rc == code), (rc, err)
    assert err.startswith("saq: error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


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
