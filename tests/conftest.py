import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|: the error measure the exactness contract uses."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
