import os

import pytest
import torch

# Small tensors: one thread avoids OpenMP contention (DDP tests run 2 processes on 2 cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
