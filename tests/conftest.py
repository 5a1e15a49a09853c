import os

import pytest
import torch

# Without a GPU, Triton's kernels (torchsaq/_triton_lsq.py) run in Triton's CPU interpreter, which must be
# chosen before triton is first imported (its own library functions are decorated at import); inductor's
# CPU code does not use Triton, so nothing else changes. test_kernels.py runs them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torchsaq as saq

# Small tensors: one thread avoids OpenMP contention (DDP tests run 2 processes on 2 cores).
torch.set_num_threads(1)

# Subprocesses (`python -m torchsaq`, torchrun) import the same saq as the tests, whatever the current folder
# (a relative PYTHONPATH=src would stop pointing at it once a test changes folder).
_SRC = os.path.dirname(os.path.dirname(os.path.abspath(saq.__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join([_SRC, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _own_cwd(tmp_path, monkeypatch):
    """Every test runs in its own empty folder: what a user's `torchsaq train` left in the checkout (runs/saq,
    landscape/, exports) cannot change a test, and a test cannot write into the checkout."""
    monkeypatch.chdir(tmp_path)
