"""Pruning math, no Lightning: gradient statistics, criteria, selection (top-k, floors), masks, schedules,
structured unit families and the event controller (accept / roll back / back off)."""
