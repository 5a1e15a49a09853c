import os

import pytest
import torch

# CI has 2 cores; more threads than that only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
