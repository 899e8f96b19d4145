"""Shared building blocks, no Lightning: argument validation, module selection, byte accounting, atomic files,
the metric gate and small context managers."""
