"""Kept so that configs written for 0.1 (`class_path: lightning_compress.models.<Name>`) still load; the demo
models live in :mod:`lightning_compress.demos`."""

from lightning_compress.demos.models import *  # noqa: F403
