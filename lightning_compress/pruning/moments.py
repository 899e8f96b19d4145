"""Count / mean / M2 of a stream of equally shaped samples, merged in blocks (Chan et al.), the checked copy of
checkpoint tensors into statistics buffers, and the block layout and finiteness probes of the
update. Pure PyTorch: no Lightning import. Used by :mod:`.statistics`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_compress.core._compat import foreach_norm


class RunningMoments:
    """Count / mean / M2 (float64) of a stream of equally shaped float32 samples. Samples are stored in a block of
    ``block`` rows (written in place through :meth:`slot`, or copied by :meth:`add`) and merged with Chan et al.'s
    formula when the block is full or before any read: per sample that is no op at all instead of Welford's five,
    and the block's own moments are two-pass."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, block: int = 32) -> None:
        self.count = 0
        self._mean = torch.zeros(shape, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(shape, dtype=torch.float64, device=device)
        self.pending = torch.empty((block, *shape), dtype=torch.float32, device=device)
        self.n_pending = 0

    def add(self, x: Tensor) -> None:
        self.slot().copy_(x)
        self.commit()

    def slot(self) -> Tensor:
        """The storage of the next sample, to be written in place (no copy); it counts only after :meth:`commit`,
        so a sample found bad while being written is simply overwritten by the next one."""
        return self.pending[self.n_pending]

    def commit(self) -> None:
        """Count the sample written into :meth:`slot`."""
        self.n_pending += 1
        if self.n_pending == len(self.pending):
            self.flush()

    def flush(self) -> None:
        n_b = self.n_pending
        if n_b == 0:
            return
        # the block's own moments in float32, in place (the samples are consumed), shifted by the block's first
        # sample and then two-pass: x - first is exact for samples near it, so a mean that dwarfs the spread costs
        # no accuracy (unshifted float32 lost about 0.3 % of the variance at mean / std = 1e5). Only the merge,
        # where the count grows without bound, needs float64; widening the block first cost more than all the rest
        block = self.pending[:n_b]
        first = block[0].clone()
        mean_y = block.sub_(first).mean(0)
        m2_b = block.sub_(mean_y).square_().sum(0).to(torch.float64)
        mean_b = first.to(torch.float64).add_(mean_y)
        n = self.count + n_b
        delta = mean_b - self._mean
        self._mean.add_(delta, alpha=n_b / n)
        self._m2.add_(m2_b).addcmul_(delta, delta, value=self.count * n_b / n)
        self.count, self.n_pending = n, 0

    @property
    def mean(self) -> Tensor:
        self.flush()
        return self._mean

    @property
    def m2(self) -> Tensor:
        self.flush()
        return self._m2

    def variance(self) -> Tensor:
        return (self.m2 / max(self.count, 1)).clamp_min(0)

    def state_dict(self, rows: Sequence[str]) -> dict:
        """Saved as it is (pending samples not merged), so a resumed run merges at the same steps. One entry per
        row of the first dimension, named by ``rows``."""
        return {
            **{key: {"count": self.count, "mean": self._mean[row].cpu().clone(), "m2": self._m2[row].cpu().clone()}
               for row, key in enumerate(rows)},
            "pending": self.pending[: self.n_pending].cpu().clone(),
        }

    def load_state_dict(self, state: dict, rows: Sequence[str]) -> None:
        self.count = int(state[rows[0]]["count"])
        for row, key in enumerate(rows):
            copy_checked(f"per-unit {key}", [self._mean[row], self._m2[row]],
                          [state[key]["mean"], state[key]["m2"]], ["mean", "m2"])
        pending = state.get("pending")
        if pending is not None and (pending.dim() != self.pending.dim() or len(pending) > len(self.pending)
                                    or pending.shape[1:] != self.pending.shape[1:]):
            raise ValueError(f"the checkpoint's pending per-unit samples are shaped {tuple(pending.shape)}, expected "
                             f"(<= {len(self.pending)}, {', '.join(map(str, self.pending.shape[1:]))})")
        self.n_pending = 0 if pending is None else len(pending)
        if pending is not None:
            self.pending[: len(pending)].copy_(pending)


def copy_checked(what: str, destinations: Sequence[Tensor], sources: Sequence[Tensor], names: Sequence[str]) -> None:
    """Copy checkpoint tensors into the buffers, refusing any of another shape (``copy_`` would broadcast it)."""
    if len(sources) != len(destinations):
        raise ValueError(f"the checkpoint holds {len(sources)} {what} tensors, this run tracks {len(destinations)}")
    for name, dst, src in zip(names, destinations, sources):
        if not isinstance(src, Tensor) or src.shape != dst.shape:
            got = tuple(src.shape) if isinstance(src, Tensor) else type(src).__name__
            raise ValueError(f"the checkpoint's {what} statistics of {name!r} are shaped {got}, expected "
                             f"{tuple(dst.shape)}: a checkpoint of another model?")
        dst.copy_(src)


def peak(t: Tensor) -> float:
    """Largest ``|t|`` (NaN if ``t`` holds one, so that ``not peak(t) <= bound`` refuses it), for the small
    per-unit signals: one ``aminmax`` pass (``torch.linalg.vector_norm(t, inf)`` is far slower on CPU)."""
    low, high = torch.aminmax(t)
    return float(torch.maximum(high, low.neg()))


def largest_norm(tensors: Sequence[Tensor]) -> float:
    """Largest L2 norm among ``tensors`` (NaN/inf if one holds NaN/inf): one ``torch._foreach_norm`` for all of
    them, accumulated and returned in float32 so that loss-scaled fp16 gradients do not overflow fp16."""
    return float(torch.stack(foreach_norm(tensors, dtype=torch.float32)).max())


BLOCK = 1 << 17  # elements (512 KiB of float32) per block on CPU: d, and the block of mean, stay in a core's L2
# cache between the ops of a block (4 MiB blocks spilled it: each op then read memory again); fewer blocks only save
# the per-op overhead, a few microseconds each


def blocks(sizes: Sequence[int], limit: int | None) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Cut the concatenation of tensors of ``sizes`` elements into blocks of at most ``limit`` elements (``None``:
    one tensor per block), consecutive small tensors sharing one. Each block: ``(start, end, parts)`` in flat
    coordinates, ``parts`` = ``(tensor index, first, last)`` ranges of the tensors' flattened elements."""
    blocks: list[tuple[int, int, list[tuple[int, int, int]]]] = []
    offset = 0
    for index, size in enumerate(sizes):
        step = size if limit is None else limit
        for lo in range(0, size, step):
            hi = min(size, lo + step)
            start, end, parts = blocks[-1] if blocks else (0, 0, [])
            if limit is not None and blocks and end == offset + lo and end - start + hi - lo <= limit:
                blocks[-1] = (start, offset + hi, [*parts, (index, lo, hi)])
            else:
                blocks.append((offset + lo, offset + hi, [(index, lo, hi)]))
        offset += size
    return blocks
