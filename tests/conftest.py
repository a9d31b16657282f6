"""Shared test set-up: one thread per test process, and a fresh accelerate state for tests that ask for it.

pytest runs on two workers (pytest.ini: -n 2) and the CI machine has two cores. Tiny tensors run as fast on
one thread, and far faster when the cores are contended (OpenMP threads spin against the other worker), so
each worker computes on one thread, and so do the scripts the tests launch (OMP_NUM_THREADS is inherited).
"""
import os

import pytest
import torch

# Never reach for the network in tests: hub look-ups must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps a process-wide singleton; each in-process train.main() or Accelerator gets a fresh one."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
