"""Model structure, no Lightning: which units depend on which (``dependency``) and physically removing pruned
units (``compaction``)."""
