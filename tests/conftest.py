import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

MFTMA_DATA = Path(__file__).parent / "data" / "mftma"
MFTMA_SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "mftma"


def load_mftma_case(case: str) -> list[np.ndarray]:
    """Per-class (points, features) float64 arrays of a reference MFTMA input: tests/data/mftma, else
    ../shared/reference/mftma/inputs; the test is skipped when neither holds it."""
    path = MFTMA_DATA / f"{case}.npz"
    if not path.exists():
        path = MFTMA_SHARED / "inputs" / f"{case}.npz"
        if not path.exists():
            pytest.skip(f"{case} input not stored and ../shared/reference/mftma not present")
    d = np.load(path, allow_pickle=False)
    P = json.loads(str(d["meta"]))["P"]
    return [d[f"X_{i:03d}"].astype(np.float64).T for i in range(P)]


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> None:
    """A fake idx file (unsigned bytes; ``path`` + ".gz" gzip-compressed when gz), as MNIST ships them."""
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def blas_one_thread():
    """In-process analyses at 1 BLAS thread, as on Dask workers: MFTMA's thread pool over multi-threaded
    BLAS thrashes on 2 busy cores (docs/performance.md). Restored after the test."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


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
