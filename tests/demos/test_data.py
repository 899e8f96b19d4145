"""Built-in datamodules: resuming from a checkpoint taken mid-epoch continues with the same batches."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.demos.data import DigitsDataModule, EpochSeededSampler, ResumableDataLoader
from lightning_compress.demos.models import MLPClassifier


class _Recorder(pl.Callback):
    """The label sequence of every training batch: a fingerprint of which samples, in which order."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(tuple(batch[1].tolist()))


def _fit(root: Path, max_steps: int, ckpt_path: str | None = None, every: int | None = None) -> _Recorder:
    torch.manual_seed(0)
    recorder = _Recorder()
    callbacks: list[pl.Callback] = [recorder]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1))
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         default_root_dir=root, enable_checkpointing=bool(every))
    with warnings.catch_warnings():
        warnings.simplefilter("error", pl.utilities.warnings.PossibleUserWarning)  # "dataloader is not resumable"
        warnings.filterwarnings("ignore", message=".*(does not have many workers|number of training batches).*")
        trainer.fit(MLPClassifier(input_size=64, hidden=[16]), DigitsDataModule(batch_size=128), ckpt_path=ckpt_path)
    return recorder


@pytest.mark.parametrize("resume_at", [4, 13], ids=["mid_first_epoch", "mid_second_epoch"])
def test_resume_mid_epoch_sees_the_uninterrupted_batches(tmp_path: Path, resume_at: int) -> None:
    """10 batches per epoch; a checkpoint after ``resume_at`` steps, then resumed to 16 steps."""
    full = _fit(tmp_path / "full", 16).batches
    assert len(full) == 16 and full[:10] != full[10:16] + full[:4]  # epochs differ in order
    first = _fit(tmp_path / "a", resume_at, every=resume_at).batches
    ckpt = next((tmp_path / "a").glob(f"*step={resume_at}.ckpt"))
    resumed = _fit(tmp_path / "b", 16, ckpt_path=str(ckpt)).batches
    assert first + resumed == full


def test_loader_state_skips_the_batches_handed_out_in_the_same_epoch_only() -> None:
    data = TensorDataset(torch.arange(20).float(), torch.arange(20))
    sampler = EpochSeededSampler(20, seed=3)
    loader = ResumableDataLoader(data, batch_size=4, sampler=sampler)
    sampler.set_epoch(2)
    reference = [b[1].tolist() for b in loader]
    it = iter(loader)
    seen = [next(it)[1].tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 2} and seen == reference[:2]

    fresh_sampler = EpochSeededSampler(20, seed=3)
    fresh = ResumableDataLoader(data, batch_size=4, sampler=fresh_sampler)
    fresh.load_state_dict(state)
    assert fresh_sampler.epoch == 2  # set at load: iterators that draw indices at once use the right order
    assert [b[1].tolist() for b in fresh] == reference[2:]
    assert fresh.state_dict() == {"epoch": 2, "batches": 5}  # counts from the start of the epoch
    assert [b[1].tolist() for b in fresh] == reference  # the skip applies once

    other = ResumableDataLoader(data, batch_size=4, sampler=EpochSeededSampler(20, seed=3))
    other.load_state_dict(state)
    other.sampler.set_epoch(3)  # the saved epoch had finished: the next epoch starts from its beginning
    assert len(list(other)) == 5


def test_end_of_epoch_state_does_not_skip_the_next_epoch() -> None:
    data = TensorDataset(torch.arange(8).float(), torch.arange(8))
    loader = ResumableDataLoader(data, batch_size=4, sampler=EpochSeededSampler(8, seed=0))
    list(loader)
    fresh = ResumableDataLoader(data, batch_size=4, sampler=EpochSeededSampler(8, seed=0))
    fresh.load_state_dict(loader.state_dict())  # {"epoch": 0, "batches": 2}: the whole epoch
    assert len(list(fresh)) == 2


@pytest.mark.parametrize("state", [{}, {"epoch": 0, "batches": -1}, {"epoch": "0", "batches": 1},
                                   {"epoch": 0, "batches": 1.5}])
def test_bad_loader_state_is_refused(state: dict) -> None:
    loader = ResumableDataLoader(TensorDataset(torch.zeros(4)), batch_size=2)
    with pytest.raises(ValueError, match=r"`state` of ResumableDataLoader must hold an int `epoch`.*got"):
        loader.load_state_dict(state)


def test_sampler_state_of_another_dataset_is_refused() -> None:
    sampler = EpochSeededSampler(10, seed=1)
    sampler.set_epoch(4)
    assert sampler.state_dict() == {"size": 10, "seed": 1, "epoch": 4}
    with pytest.raises(ValueError, match="is for size 10 / seed 1, this sampler has size 11 / seed 1"):
        EpochSeededSampler(11, seed=1).load_state_dict(sampler.state_dict())


def test_only_the_train_loader_is_resumable() -> None:
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    assert isinstance(dm.train_dataloader(), ResumableDataLoader)
    assert type(dm.val_dataloader()) is DataLoader and type(dm.test_dataloader()) is DataLoader
