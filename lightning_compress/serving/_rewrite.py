"""Rewrite one quantized layer of an exported ONNX graph onto integer operators. No Lightning, no torch import.

Each function takes the :class:`~._graph.WeightSite` of one weight (its initializer and the ``Gemm`` / ``MatMul``
/ ``Conv`` that reads it) and our integer codes, and returns the operator it emitted, or raises
:class:`Unsupported` with the reason (the caller then keeps the layer as a weight-only ``DequantizeLinear``).

- ``dynamic``: ``DynamicQuantizeLinear`` on the activation, ``MatMulInteger`` / ``ConvInteger`` on our int8 codes,
  then ``Cast -> Mul(x_scale * w_scale) -> Add(bias)`` -- the pattern ORT's ``quantize_dynamic`` emits, which ORT
  fuses into ``DynamicQuantizeMatMul``;
- ``static``: QDQ -- ``DequantizeLinear`` initializers with our codes and per-channel scales, an int32 bias, and
  ``QuantizeLinear -> DequantizeLinear`` pairs with calibrated uint8 scales on the activations, which ORT fuses into
  ``QLinearConv`` / ``QGemm`` / ``QLinearMatMul``;
- ``MatMulNBits`` (``com.microsoft``) for Linear weights of <= 4 bits or per-group scales: our codes shifted to
  unsigned and packed along K, one scale per block (a group of ``g`` inputs is ``g / block`` blocks sharing its
  scale, so nothing is re-quantized).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_compress.serving._graph import Graph, WeightSite

INT8 = np.int8
_FLOAT = 1  # onnx.TensorProto.FLOAT
MIN_BLOCK, MAX_BLOCK = 16, 256  # MatMulNBits block sizes: powers of two in [16, ...]
_ROW_BLOCK = 128  # block size used for per-channel / per-tensor codes (one scale per row, repeated)


class Unsupported(Exception):
    """This layer cannot run on an integer operator; the message says why."""


def _attrs(node: Any, onnx: Any) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def operands(graph: Graph, site: WeightSite) -> tuple[str, str | None, str]:
    """(activation input, bias input or None, output) of the node reading the weight, checking its form."""
    node, attrs = site.node, _attrs(site.node, graph.onnx)
    if node.op_type == "Gemm":
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            raise Unsupported(f"Gemm {node.name!r} has alpha/beta != 1 or transA")
        want = "same" if attrs.get("transB", 0) else "transposed"
        if node.input[1] != site.initializer or site.layout != want:
            raise Unsupported(f"Gemm {node.name!r} reads the weight in an unexpected layout")
        bias = graph.through_identity(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return node.input[0], bias, node.output[0]
    if node.op_type == "MatMul":
        if node.input[1] != site.initializer or site.layout != "transposed":
            raise Unsupported(f"MatMul {node.name!r} reads the weight as its first operand")
        return node.input[0], None, node.output[0]
    if node.op_type == "Conv":
        if node.input[1] != site.initializer or site.layout != "same":
            raise Unsupported(f"Conv {node.name!r} reads the weight in an unexpected layout")
        bias = graph.through_identity(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return node.input[0], bias, node.output[0]
    raise Unsupported(f"the weight is read by a {node.op_type} node ({node.name!r}); integer forms exist for "
                      "Gemm, MatMul and Conv")


def int8_codes(qt: Any) -> np.ndarray:
    """Our codes as int8 (codes minus zero point), or :class:`Unsupported` when they have no such form."""
    codes = qt.int_weight()
    if codes is None:
        raise Unsupported(f"{qt.spec.bits}-bit {qt.spec.granularity} codes have no int8 form")
    return codes.cpu().numpy()


def fold_rows(codes: np.ndarray, scale: np.ndarray, factor: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Our int8 codes, unchanged, and float32 per-row scales times a folded BatchNorm's row factor (a negative
    factor gives a negative scale: negating the codes instead would overflow code -128)."""
    if factor is None:
        return codes, scale.astype(np.float32)
    return codes, (scale.astype(np.float64) * factor).astype(np.float32)


def _bias(graph: Graph, bias: str | None, shape: tuple[int, ...]) -> str | None:
    if bias is None:
        return None
    if bias not in graph.inits:
        raise Unsupported(f"the bias {bias!r} is computed in the graph, not an initializer")
    return graph.add_init(f"{bias}_reshaped", graph.array(bias).astype(np.float32).reshape(shape))


def _dynamic_input(graph: Graph, tensor: str) -> tuple[str, str, str]:
    if tensor not in graph.dynamic:  # one DynamicQuantizeLinear per activation, shared by its readers
        q, s, z = (graph.unique(f"{tensor}_{part}") for part in ("quantized", "scale", "zero_point"))
        graph.add_node("DynamicQuantizeLinear", [tensor], [q, s, z])
        graph.dynamic[tensor] = (q, s, z)
    return graph.dynamic[tensor]


def dynamic(graph: Graph, site: WeightSite, key: str, codes: np.ndarray, scale: np.ndarray) -> str:
    """``DynamicQuantizeLinear -> MatMulInteger / ConvInteger -> Cast -> Mul -> Add``; returns the integer op."""
    x, bias, y = operands(graph, site)
    codes, scale = fold_rows(codes, scale, site.row_factor)
    out_ch = codes.shape[0]
    conv = site.node.op_type == "Conv"
    bshape = (out_ch, *([1] * (codes.ndim - 2))) if conv else (out_ch,)
    bias_name = _bias(graph, bias, bshape)
    xq, xs, xz = _dynamic_input(graph, x)
    ws = graph.add_init(f"{key}_scale", scale.reshape(bshape))
    if conv:
        wq = graph.add_init(f"{key}_quantized", codes)
        wz = graph.add_init(f"{key}_zero_point", np.array(0, dtype=INT8))
        op, attrs = "ConvInteger", _attrs(site.node, graph.onnx)
    else:
        wq = graph.add_init(f"{key}_quantized", np.ascontiguousarray(codes.T))  # (in, out)
        wz = graph.add_init(f"{key}_zero_point", np.zeros(out_ch, dtype=INT8))
        op, attrs = "MatMulInteger", {}
    scales, acc, acc_f = (graph.unique(f"{key}_{s}") for s in ("scales", "int32", "float"))
    graph.add_node("Mul", [xs, ws], [scales])
    graph.add_node(op, [xq, wq, xz, wz], [acc], **attrs)
    graph.add_node("Cast", [acc], [acc_f], to=_FLOAT)
    scaled = graph.unique(f"{key}_scaled") if bias_name else y
    graph.add_node("Mul", [acc_f, scales], [scaled])
    if bias_name:
        graph.add_node("Add", [scaled, bias_name], [y])
    graph.graph.node.remove(site.node)
    return op


def static(graph: Graph, site: WeightSite, key: str, codes: np.ndarray, scale: np.ndarray) -> str:
    """QDQ weight (our codes, per-channel scales), int32 bias; the activation input must already be QDQ'd."""
    x, bias, _ = operands(graph, site)
    if x not in graph.params:
        raise Unsupported(f"its input {x!r} has no calibrated activation scale")
    codes, scale = fold_rows(codes, scale, site.row_factor)
    out_ch = codes.shape[0]
    matmul = site.node.op_type == "MatMul"
    stored, axis = (np.ascontiguousarray(codes.T), 1) if matmul else (codes, 0)
    wq = graph.add_init(f"{key}_quantized", stored)
    ws = graph.add_init(f"{key}_scale", scale)
    wz = graph.add_init(f"{key}_zero_point", np.zeros(out_ch, dtype=INT8))
    wdq = graph.unique(f"{key}_DequantizeLinear")
    graph.add_node("DequantizeLinear", [wq, ws, wz], [wdq], axis=axis)
    site.node.input[1] = wdq
    if bias is not None:
        if bias not in graph.inits:
            raise Unsupported(f"the bias {bias!r} is computed in the graph, not an initializer")
        bias_scale = (np.float64(graph.params[x][0]) * scale.astype(np.float64)).astype(np.float32)
        values = graph.array(bias).astype(np.float64).reshape(-1) / bias_scale.astype(np.float64)
        bq = graph.add_init(f"{bias}_quantized", np.clip(np.round(values), -(2**31), 2**31 - 1).astype(np.int32))
        bs = graph.add_init(f"{bias}_quantized_scale", bias_scale)
        bz = graph.add_init(f"{bias}_quantized_zero_point", np.zeros(out_ch, dtype=np.int32))
        bdq = graph.unique(f"{bias}_DequantizeLinear")
        graph.add_node("DequantizeLinear", [bq, bs, bz], [bdq], axis=0)
        site.node.input[2] = bdq
    return {"Conv": "QLinearConv", "Gemm": "QGemm", "MatMul": "QLinearMatMul"}[site.node.op_type]


def nbits_block(granularity: str, group_size: int, in_features: int) -> int:
    """The MatMulNBits block size for these codes: a power of two >= 16 that each group of one scale is a whole
    number of; raises :class:`Unsupported` when there is none."""
    if granularity != "per_group":
        return _ROW_BLOCK if in_features >= _ROW_BLOCK else max(MIN_BLOCK, 1 << (in_features - 1).bit_length())
    block = group_size & -group_size  # largest power of two dividing the group size
    block = min(block, MAX_BLOCK)
    if block < MIN_BLOCK:
        raise Unsupported(f"group_size {group_size} is not a multiple of 16 (MatMulNBits blocks are powers of two "
                          f">= {MIN_BLOCK}); use e.g. group_size=32, 64, 112 or 128")
    return block


def matmul_nbits(graph: Graph, site: WeightSite, key: str, qt: Any, accuracy_level: int) -> str:
    """``com.microsoft.MatMulNBits`` (4 bits for codes of <= 4 bits, else 8) with our codes and scales."""
    x, bias, y = operands(graph, site)
    if site.node.op_type == "Conv" or site.row_factor is not None:
        raise Unsupported("MatMulNBits only replaces Linear layers (Gemm / MatMul)")
    spec = qt.spec
    n, k = qt.shape
    block = nbits_block(spec.granularity, spec.group_size, k)
    nbits = 4 if spec.bits <= 4 else 8
    blocks = -(-k // block)
    groups = qt.scale.shape[1]  # scale: (rows, groups)
    q = qt.q.cpu().numpy().astype(np.int32)  # (n, k)
    scale = qt.scale.float().cpu().numpy().reshape(qt.scale.shape[0], groups)
    zero = None if qt.zero_point is None else qt.zero_point.cpu().numpy().astype(np.int32).reshape(scale.shape)
    if spec.granularity == "per_group":
        per_block = spec.group_size // block
        scale, zero = np.repeat(scale, per_block, 1), None if zero is None else np.repeat(zero, per_block, 1)
    else:
        scale = np.broadcast_to(scale, (n, blocks))
        zero = None if zero is None else np.broadcast_to(zero, (n, blocks))
    if zero is None:
        codes, zero_full = q + (1 << (nbits - 1)), None  # symmetric: ORT's default zero point 2^(bits-1)
        pad_value = np.full((n, blocks), 1 << (nbits - 1))
    else:
        codes, zero_full, pad_value = q, zero, zero
    padded = np.repeat(pad_value, block, axis=1)[:, : blocks * block].copy()  # padding dequantizes to 0
    padded[:, :k] = codes
    b_packed = pack(padded.reshape(n, blocks, block), nbits)
    inputs = [x, graph.add_init(f"{key}_quantized", b_packed),
              graph.add_init(f"{key}_scale", np.ascontiguousarray(scale, dtype=np.float32).reshape(-1))]
    if zero_full is not None:
        inputs.append(graph.add_init(f"{key}_zero_point", pack(np.asarray(zero_full), nbits).reshape(-1)))
    if bias is not None:
        inputs += [""] * (5 - len(inputs)) + [bias]
    graph.add_node("MatMulNBits", inputs, [y], domain="com.microsoft", K=k, N=n, bits=nbits, block_size=block,
                   accuracy_level=accuracy_level)
    graph.graph.node.remove(site.node)
    return "MatMulNBits"


def pack(codes: np.ndarray, nbits: int) -> np.ndarray:
    """Unsigned codes (..., m) -> uint8 bytes along the last axis: 8 bits one per byte, 4 bits low nibble first."""
    codes = codes.astype(np.uint8)
    if nbits == 8:
        return np.ascontiguousarray(codes)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), dtype=np.uint8)], axis=-1)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))


def weight_only(graph: Graph, site: WeightSite, key: str, qt: Any) -> None:
    """Replace the float initializer by ``DequantizeLinear`` of our codes (ORT folds it back to float at load:
    a smaller file, float kernels)."""
    spec = qt.spec
    q = qt.q.cpu().numpy()
    rows = q.shape[0]
    scale = qt.scale.float().cpu().numpy()  # (rows or 1, groups)
    zero = None if qt.zero_point is None else qt.zero_point.cpu().numpy()
    if spec.granularity == "per_tensor" and site.row_factor is not None:
        scale = np.broadcast_to(scale, (rows, 1))
        zero = None if zero is None else np.broadcast_to(zero, (rows, 1))
    groups = scale.shape[1] if scale.ndim == 2 else 1
    if site.row_factor is not None:
        scale = (scale.astype(np.float64) * site.row_factor[:, None]).astype(np.float32)
    flat_rows = scale.size
    codes = q.reshape(flat_rows, -1) if groups > 1 else q  # per-group: one row per (row, group)
    inputs = [graph.add_init(f"{key}_quantized", np.ascontiguousarray(codes)),
              graph.add_init(f"{key}_scale", scale.reshape(-1) if flat_rows > 1 else scale.reshape(()))]
    if zero is not None:
        inputs.append(graph.add_init(f"{key}_zero_point", np.ascontiguousarray(zero).reshape(-1) if flat_rows > 1
                                     else np.asarray(zero).reshape(())))
    target = site.initializer
    graph.remove_init(target)
    dq = graph.unique(f"{key}_DequantizeLinear") if (groups > 1 or site.layout == "transposed") else target
    graph.add_node("DequantizeLinear", inputs, [dq], axis=0)
    if groups > 1:
        shaped = graph.unique(f"{key}_reshaped") if site.layout == "transposed" else target
        shape = graph.add_init(f"{key}_shape", np.array(q.shape, dtype=np.int64))
        graph.add_node("Reshape", [dq, shape], [shaped])
        dq = shaped
    if site.layout == "transposed":
        graph.add_node("Transpose", [dq], [target], perm=[1, 0])


def embedding_operands(graph: Graph, site: WeightSite) -> list[tuple[str, str]]:
    """(ids input, output) of each ``Gather`` reading an embedding table, checking each reads rows (axis 0)."""
    out = []
    for node in (site.node, *site.others):
        axis = _attrs(node, graph.onnx).get("axis", 0)
        if node.input[0] != site.initializer or site.layout != "same" or axis != 0 or site.row_factor is not None:
            raise Unsupported(f"Gather {node.name!r} does not read the embedding table as rows (axis 0)")
        out.append((node.input[1], node.output[0]))
    return out


def gather(graph: Graph, site: WeightSite, key: str, qt: Any) -> str:
    """An embedding lookup on our codes: ``Gather`` of the int8 / uint8 table, then ``Cast -> (Sub zero point) ->
    Mul scale`` on the gathered rows only (their scales gathered alike). The table stays integer in memory; a
    ``DequantizeLinear`` of the whole table would be folded back to float by ORT at load."""
    lookups = embedding_operands(graph, site)
    spec = qt.spec
    q = qt.q.cpu().numpy()
    rows, width = q.shape
    groups = qt.scale.shape[1] if qt.scale.dim() == 2 else 1
    if spec.granularity == "per_tensor" or qt.scale.shape[0] != rows:
        raise Unsupported("an embedding table needs one scale per row (per_channel / per_group) to be gathered")
    dtype = INT8 if q.min() >= -128 and q.max() <= 127 else np.uint8
    if dtype == np.uint8 and (q.min() < 0 or q.max() > 255):
        raise Unsupported(f"{spec.bits}-bit codes do not fit in 8 bits")
    table = graph.add_init(f"{key}_quantized", np.ascontiguousarray(q.reshape(rows, groups, width // groups)
                                                                    .astype(dtype)))
    scale = graph.add_init(f"{key}_scale", qt.scale.float().cpu().numpy().reshape(rows, groups, 1))
    zero = None if qt.zero_point is None else \
        graph.add_init(f"{key}_zero_point", qt.zero_point.float().cpu().numpy().reshape(rows, groups, 1))
    width_init = graph.add_init(f"{key}_width", np.array([width], dtype=np.int64))
    for ids, out in lookups:  # one table in the file, however many lookups read it
        codes, values = graph.unique(f"{key}_gathered"), graph.unique(f"{key}_float")
        graph.add_node("Gather", [table, ids], [codes], axis=0)
        graph.add_node("Cast", [codes], [values], to=_FLOAT)
        if zero is not None:
            picked, centered = graph.unique(f"{key}_zero_gathered"), graph.unique(f"{key}_centered")
            graph.add_node("Gather", [zero, ids], [picked], axis=0)
            graph.add_node("Sub", [values, picked], [centered])
            values = centered
        scales, scaled = graph.unique(f"{key}_scales"), graph.unique(f"{key}_scaled")
        graph.add_node("Gather", [scale, ids], [scales], axis=0)
        graph.add_node("Mul", [values, scales], [scaled])  # (*ids, groups, group_len)
        ids_shape, shape = graph.unique(f"{key}_ids_shape"), graph.unique(f"{key}_out_shape")
        graph.add_node("Shape", [ids], [ids_shape])
        graph.add_node("Concat", [ids_shape, width_init], [shape], axis=0)
        graph.add_node("Reshape", [scaled, shape], [out])
    for node in (site.node, *site.others):
        graph.graph.node.remove(node)
    return "Gather"
