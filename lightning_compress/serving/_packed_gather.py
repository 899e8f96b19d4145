"""A 4-bit embedding table kept packed, two codes per byte, in the ONNX graph. No Lightning, no torch import.

``Gather`` of the integer table (:func:`._rewrite.gather`) stores one byte per code, so a 4-bit table would be as
large as an 8-bit one (plus twice the scales). ``com.microsoft.GatherBlockQuantized`` reads packed 4-bit rows with
one scale per block of the last axis, so the table stays half a byte per code in the file and in memory. Its
constraints: a block is a power of two >= 16, every block has its own scale (a group of ``g`` codes sharing one
scale is ``g / block`` blocks repeating it, nothing re-quantized), uint8 data packed low nibble first, the zero
points packed alike (absent: 8, which is how symmetric codes in [-8, 7] shifted by +8 decode).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_compress.serving._graph import Graph, WeightSite
from lightning_compress.serving._rewrite import MIN_BLOCK, Unsupported, embedding_operands, gather, pack
from lightning_compress.serving._runtime import version_tuple

PACKED_BITS = 4
MIN_ORT = (1, 23)  # uint8 data (onnxruntime PR 24239), its `bits` attribute and zero points (PR 25214); tested: 1.32
ODD_ZERO_MIN_ORT = (1, 24)  # packed zero points of rows with an odd number of blocks (indexing fixed in PR 26506)


def block_size(width: int, groups: int) -> int:
    """The largest power of two dividing one scale's group of codes; :class:`Unsupported` when below 16."""
    group = width // groups
    block = group & -group
    if block < MIN_BLOCK:
        raise Unsupported(f"4-bit codes kept one per byte: a group of {group} codes per scale is not a multiple of "
                          f"{MIN_BLOCK} (GatherBlockQuantized blocks are powers of two >= {MIN_BLOCK}); use e.g. "
                          "group_size=32, 64 or 128")
    return block


def gather_block_quantized(graph: Graph, site: WeightSite, key: str, qt: Any, ort_version: str) -> str:
    """``GatherBlockQuantized`` on our 4-bit codes packed two per byte, with our scales (and zero points)."""
    lookups = embedding_operands(graph, site)
    q = qt.q.cpu().numpy().astype(np.int32)  # (rows, width)
    rows, width = q.shape
    if qt.scale.dim() != 2 or qt.scale.shape[0] != rows:
        raise Unsupported("an embedding table needs one scale per row (per_channel / per_group) to be gathered")
    groups = qt.scale.shape[1]
    block = block_size(width, groups)
    odd_zero = qt.zero_point is not None and (width // block) % 2 == 1
    need = ODD_ZERO_MIN_ORT if odd_zero else MIN_ORT
    if version_tuple(ort_version) < need:
        what = "with zero points and an odd number of blocks per row " if odd_zero else ""
        raise Unsupported(f"4-bit codes kept one per byte: GatherBlockQuantized on packed uint8 {what}needs "
                          f"onnxruntime >= {'.'.join(map(str, need))}, found {ort_version}")
    repeat = width // groups // block  # blocks per group, sharing its scale
    scale = np.repeat(qt.scale.float().cpu().numpy(), repeat, axis=1)  # (rows, width / block)
    if qt.zero_point is None:
        codes, zero = q + (1 << (PACKED_BITS - 1)), None  # symmetric: the op's default zero point 8
    else:
        codes, zero = q, np.repeat(qt.zero_point.cpu().numpy().astype(np.int32).reshape(rows, groups), repeat, 1)
    if codes.min() < 0 or codes.max() >= 1 << PACKED_BITS:
        raise Unsupported(f"4-bit codes kept one per byte: codes span [{codes.min()}, {codes.max()}] after the shift, "
                          "not [0, 15]")
    inputs = [graph.add_init(f"{key}_quantized", pack(codes, PACKED_BITS)),
              graph.add_init(f"{key}_scale", np.ascontiguousarray(scale, dtype=np.float32))]
    if zero is not None:
        inputs.append(graph.add_init(f"{key}_zero_point", pack(zero, PACKED_BITS)))
    for ids, out in lookups:  # one packed table, however many lookups read it
        graph.add_node("GatherBlockQuantized", [inputs[0], ids, *inputs[1:]], [out], domain="com.microsoft",
                       bits=PACKED_BITS, block_size=block, gather_axis=0, quantize_axis=1)
    for node in (site.node, *site.others):
        graph.graph.node.remove(node)
    return "GatherBlockQuantized"


def embedding(graph: Graph, site: WeightSite, key: str, qt: Any, ort_version: str) -> tuple[str, str]:
    """(operator, reason): 4-bit codes packed on ``GatherBlockQuantized`` when they fit its constraints, else (and
    for other widths) ``Gather`` of one byte per code -- with the reason when 4-bit codes could not stay packed."""
    if qt.spec.bits == PACKED_BITS:
        try:
            return gather_block_quantized(graph, site, key, qt, ort_version), ""
        except Unsupported as why:
            return gather(graph, site, key, qt), str(why)
    return gather(graph, site, key, qt), ""
