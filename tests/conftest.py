import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist

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


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, port: int):
    """A spawned test process's gloo group at 127.0.0.1:``port``. On a normal exit every rank first meets
    at a barrier: a rank that tears the group down while its peer still talks to it aborts the peer now
    and then under load ("terminate called without an active exception"). Always destroyed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
