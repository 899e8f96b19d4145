"""``PostTrainingQuantization`` under DDP: a setup refusal only rank zero can see is taken by every rank."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_compress import PostTrainingQuantization
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from tests.callbacks._rank_errors import SetupErrorFile


class _SetupErrorFile(SetupErrorFile, PostTrainingQuantization):
    """PostTrainingQuantization recording its setup error per rank (module level: ddp_spawn pickles it)."""


@pytest.mark.ddp
def test_ddp_an_export_path_only_rank_zero_can_refuse_is_refused_on_every_rank(tmp_path: Path) -> None:
    """Rank zero alone creates the export's folder, so only it finds a file standing where the folder should be;
    rank one must refuse too, in setup, instead of training on alone into the next collective."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_file").write_text("")
    callback = _SetupErrorFile(bits=8, export_path=str(out / "a_file" / "model.safetensors"))
    callback.folder = str(out)
    trainer = pl.Trainer(callbacks=[callback], max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn",
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    with pytest.raises(Exception, match="cannot be created"):
        trainer.fit(MLPClassifier(input_size=64, hidden=[32], lr=1e-2), DigitsDataModule(batch_size=64))
    errors = [(out / f"rank{r}.err").read_text() for r in (0, 1)]
    assert errors[0].startswith("ValueError") and "cannot be created" in errors[0], errors
    assert errors[1].startswith("ValueError: `export_path`") and "refused on another rank (rank 0: ValueError" \
        in errors[1], errors
