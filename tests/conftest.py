import os
import socket

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers on two cores: one thread each, or OpenMP oversubscription makes
    # every op an order of magnitude slower.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|: the error measure the exactness contract uses."""
    return float(((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).detach())


def free_port() -> int:
    """A TCP port nobody listens on now, for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
