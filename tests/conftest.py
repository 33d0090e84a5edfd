import numpy as np
import pytest


@pytest.fixture
def rng():
    """A fresh seeded Generator per test (no global RNG state)."""
    return np.random.default_rng(12345)


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly when no CUDA device is visible."""
    has_gpu = False
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch means no GPU path
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
