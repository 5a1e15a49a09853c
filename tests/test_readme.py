"""README.md's Python API example must run as written (it is the first thing a user copies)."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no Python API example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"])
    assert (tmp_path / "resnet18_w4a4.safetensors").stat().st_size > 0
