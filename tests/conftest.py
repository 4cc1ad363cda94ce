"""Shared fixtures: the real models are loaded once per test session (per xdist worker)."""

import pytest


@pytest.fixture(scope="session")
def minilm():
    from lightlm import zoo

    return zoo.load_minilm()


@pytest.fixture(scope="session")
def smollm2():
    from lightlm import zoo

    return zoo.load_smollm2(progress=False)
