"""Totals, printing and files for the compression report (rank zero only)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_compress.report import CompressionReport


def publish(report: CompressionReport, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    rank_zero_info(f"lightning-compress: metric {report.metric_before} -> {report.metric_after}")
