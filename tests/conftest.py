"""Shared fixtures. The suite runs on CPU; tests marked ``gpu`` run only where CUDA exists."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped elsewhere)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def devices() -> list[str]:
    """CPU always; CUDA too where present (the same code must run on both)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def random_complex(*shape: int, generator: torch.Generator, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    real_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
    return torch.complex(
        torch.randn(*shape, generator=generator, dtype=real_dtype),
        torch.randn(*shape, generator=generator, dtype=real_dtype),
    ).to(dtype)
