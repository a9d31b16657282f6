"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny tensors run as fast on one thread, and far faster when the 2 cores are contended (OpenMP
    threads spin against other processes), so such tests run single-threaded; the setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
