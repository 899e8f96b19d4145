"""Kept so that configs written for 0.1 (`class_path: lightning_compress.data.<Name>`) still load; the demo
data live in :mod:`lightning_compress.demos`."""

from lightning_compress.demos.data import *  # noqa: F403
