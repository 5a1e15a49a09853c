"""Packaging: `import torchsaq` needs only the core dependencies; optional ones load where used, and name their extra.

The core-install test runs a fresh interpreter without the site-packages folder (``python -S``) that sees only
the distributions ``pyproject.toml``'s core ``dependencies`` pull in (linked into a temporary folder), so it
checks the declared dependencies themselves, not just what happens to be imported.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import torchsaq

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(torchsaq.__file__).resolve().parents[1]
#: optional top-level modules that `import torchsaq` must not load (numpy is not among them: safetensors[torch],
#: a core dependency, requires it, and torch imports it when it is installed; nor filelock, which torch requires)
OPTIONAL = ("matplotlib", "sklearn", "mnist1d", "yaml", "tensorboard", "tqdm", "torchvision", "timm", "PIL", "onnx",
            "onnxruntime", "scipy", "accelerate", "transformers", "lightning")

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
packaging_requirements = pytest.importorskip("packaging.requirements")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _run(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)


def _closure(requirements: list[str]) -> list[md.Distribution]:
    """The installed distributions that ``requirements`` need, recursively (markers evaluated, no extras)."""
    Requirement = packaging_requirements.Requirement
    todo = [(Requirement(r), ("",)) for r in requirements]
    found: dict[str, md.Distribution] = {}
    seen: set[tuple[str, frozenset]] = set()  # (distribution, extras): safetensors[torch] requires safetensors[numpy]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if (key, frozenset(req.extras)) in seen:
            continue
        seen.add((key, frozenset(req.extras)))
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:  # a platform-specific requirement not installed here
            continue
        found[key] = dist
        todo += [(Requirement(r), ("", *req.extras)) for r in dist.requires or []]
    return list(found.values())


def _core_site(tmp_path: Path) -> Path:
    """A folder holding links to every installed file tree of the core dependencies' distributions."""
    site = tmp_path / "core-site"
    site.mkdir()
    for dist in _closure(_pyproject()["project"]["dependencies"]):
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or (site / top).exists():
                continue
            target = Path(str(dist.locate_file(top)))
            if target.exists():
                (site / top).symlink_to(target)
    return site


@pytest.mark.slow
def test_core_install_imports_and_runs_without_any_extra(tmp_path):
    """Only torch, safetensors and what they need: the core API works and nothing optional is imported; the
    optional parts fail with an ImportError that names their extra."""
    site = _core_site(tmp_path)
    assert (site / "torch").exists() and (site / "safetensors").exists()
    assert [m for m in OPTIONAL if (site / m).exists()] == []
    out = tmp_path / "out.json"
    code = f"""
        import json, site, sys
        site.addsitedir({str(site)!r})
        sys.path.insert(0, {str(SRC)!r})
        import torch
        import torchsaq as saq

        result = {{"after_import": sorted(m for m in sys.modules if "." not in m)}}
        m = saq.create_model("cnn1d", 10)
        saq.quantize(m, saq.QuantConfig(w_bits=4, a_bits=4))
        x, y = torch.randn(8, 1, 40), torch.randint(0, 10, (8,))
        saq.calibrate(m, [x])
        opt = saq.SAQ(m, torch.optim.SGD(m.parameters(), lr=0.1), rho=0.05, strategy="prev_grad")
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        saq.summary(m)
        saq.export(m, {str(tmp_path / "m.safetensors")!r})
        cfg = saq.TrainConfig(dataset="digits", epochs=2)
        result["config"] = [cfg.model, cfg.quant_config().w_bits]
        result["datasets"] = saq.data.list_datasets()
        errors = {{}}
        checks = {{
            "data": lambda: saq.data.build_datasets("mnist1d"),
            "vision": lambda: saq.create_model("resnet18", 10),
            "timm": lambda: saq.create_model("vit_tiny_digits", 10),
            "recipe": lambda: saq.train.config.load_recipe("recipes/imagenet_resnet18_w4a4.yaml"),
        }}
        for name, fn in checks.items():
            try:
                fn()
                errors[name] = None
            except ImportError as e:
                errors[name] = str(e)
        result["errors"] = errors
        from torchsaq.cli import main
        result["cli_status"] = main(["train", "--epochs", "1", "--output", {str(tmp_path / "run")!r}])
        result["after_use"] = sorted(m for m in sys.modules if "." not in m)
        open({str(out)!r}, "w").write(json.dumps(result))
    """
    p = _run(code, "-S")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    for when in ("after_import", "after_use"):
        loaded = sorted(set(OPTIONAL) & set(r[when]))
        assert loaded == [], f"{when}: {loaded}"
    assert r["config"] == ["cnn_digits", 4] and r["datasets"][0] == "mnist1d"
    extras = {"data": "data", "vision": "vision", "timm": "timm", "recipe": "cli"}
    for name, extra in extras.items():
        assert r["errors"][name] is not None and f"pip install 'torchsaq[{extra}]'" in r["errors"][name], r["errors"]
    assert r["cli_status"] == 1
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("torchsaq: error: torchsaq train") and "pip install 'torchsaq[cli]'" in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_import_torchsaq_and_the_cli_parser_load_no_optional_module():
    """In the full test environment: `import torchsaq` (and building the CLI parser) adds none of the optional
    modules to those torch itself loads (torch.hub imports tqdm when it is installed; numpy too)."""
    p = _run("""
        import json, sys
        import torch
        by_torch = set(sys.modules)
        import torchsaq
        after_import = set(sys.modules)
        from torchsaq.cli import build_parser
        build_parser().parse_args(["train"])
        print(json.dumps({"by_torch": sorted(by_torch), "import": sorted(after_import - by_torch),
                          "cli": sorted(set(sys.modules) - by_torch)}))
    """)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    for when in ("import", "cli"):
        added = sorted({m.split(".")[0] for m in r[when]} & set(OPTIONAL))
        assert added == [], f"{when}: {added}"
    # what torch left out stays out altogether
    absent = set(OPTIONAL) - {m.split(".")[0] for m in r["by_torch"]}
    assert {"matplotlib", "sklearn", "mnist1d", "yaml", "tensorboard"} <= absent


def test_extras_named_in_errors_exist_and_test_installs_everything():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    named = set()
    for path in (SRC / "torchsaq").rglob("*.py"):
        text = path.read_text()
        named |= set(re.findall(r"torchsaq\[([a-z_]+)\]", text))
        named |= set(re.findall(r'require\("[\w.]+", "(\w+)"', text))
    from torchsaq.train import data

    named |= {data.dataset_info(d).extra for d in data.list_datasets()}
    assert named and named <= set(extras), sorted(named - set(extras))

    def expand(extra: str) -> set[str]:
        out = set()
        for req in extras[extra]:
            m = re.fullmatch(r"torchsaq\[([\w,]+)\]", req)
            out |= set().union(*(expand(e) for e in m.group(1).split(","))) if m else {req}
        return out

    assert expand("test") >= set().union(*(expand(e) for e in extras)), "the test extra must install every extra"
    Requirement = packaging_requirements.Requirement
    assert {Requirement(r).name for r in project["dependencies"]} == {"torch", "safetensors"}


def test_readme_install_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]" && torchsaq train' in readme
    assert 'pip install -q -e ".[test]"' in ci
    # CI's test command is the README's, exactly
    assert re.search(r"^python -m pytest$", ci, re.M)
    assert "```bash\npython -m pytest\n```" in readme
