"""Shared fixtures: the real models are loaded once per test session (per xdist worker)."""

import pytest
import torch


@pytest.fixture(scope="session")
def minilm():
    from lightlm import zoo

    return zoo.load_minilm()


@pytest.fixture(scope="session")
def smollm2():
    from lightlm import zoo

    return zoo.load_smollm2(progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread (use with ``pytestmark = pytest.mark.usefixtures(...)``):
    tensors this small run fastest on one thread; two contend with each other on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
