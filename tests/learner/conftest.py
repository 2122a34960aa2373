"""Learner tests run on one thread with a fixed seed (the box is shared, results repeat)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)
