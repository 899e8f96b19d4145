"""What ``compressed.ckpt`` holds: the compressed model, small, and nothing to resume training from.

A checkpoint written once the fit's compression is done (stage ``"compressed"``) is rewritten by :func:`pack`:

- the packed model lives under the ``lightning_compress`` entry as ``"packed"``: the bytes of the very safetensors
  file :func:`~lightning_compress.quantization.export.save_quantized` writes (packed codes and scales of every
  quantized weight, the float tensors that stay float, the compaction record), one ``uint8`` tensor; a model that
  was only pruned stores its (compacted) float weights there, which is the model;
- no optimizer state, learning-rate schedulers, loops, callback states (the pruning statistics) or precision state:
  only the entry, ``hyper_parameters`` and Lightning's version keys stay;
- ``state_dict`` holds, for every key of the model, an empty placeholder, plus :data:`SENTINEL`, a key whose name
  says how to load the file. Loaded by plain Lightning (no compression callback in the Trainer) it cannot load
  silently into a random model: every key is a size mismatch (raised by PyTorch even with ``strict=False``), and
  with ``strict=True`` the unexpected :data:`SENTINEL` key names ``load_compressed``.

:func:`unpack` is the way back, for :func:`~lightning_compress.load_compressed` and for the callbacks' patched
``on_load_checkpoint``: the packed file is read by the export's own checked reader (every declared shape checked
against the model and its compaction record before anything is allocated), the model is resized, and it carries the
codes again (:mod:`lightning_compress.quantization.carried`). No Lightning import.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core.io import UntrustedFileError
from lightning_compress.qat.activations import from_entry, to_entry
from lightning_compress.quantization.carried import attach, carried, drop, forget
from lightning_compress.quantization.export import (
    _read_checked,
    export_bytes,
    quantized_tensors,
    record_as_result,
)
from lightning_compress.quantization.functional import QuantizationResult
from lightning_compress.structure.serialization import shrink_to_state_dict
from lightning_compress.structure.shape_rules import RECORD_KEY, CompactedAxes, encode

CHECKPOINT_KEY = "lightning_compress"  # the entry of every checkpoint written with the callbacks
PACKED_KEY = "packed"
ACTIVATIONS_KEY = "activation_ranges"  # QAT's trained input ranges (activations="int8"), by weight key
SENTINEL = ("lightning_compress: a compressed checkpoint: load it with lightning_compress.load_compressed(model, "
            "path) or keep the compression callbacks in the Trainer")
# what a compressed checkpoint keeps beside the entry and the placeholders: what test / validate / predict read
KEPT = frozenset({"epoch", "global_step", "pytorch-lightning_version", "legacy_pytorch-lightning_version",
                  "state_dict", "hyper_parameters", "hparams_name", "datamodule_hyper_parameters",
                  "datamodule_hparams_name", CHECKPOINT_KEY})


def pack(checkpoint: dict[str, Any], model: nn.Module) -> None:
    """Rewrite ``checkpoint`` (Lightning's, of ``model``, with a ``"compressed"`` entry) in place into the compressed
    form described in the module docstring. Packing twice (two compression callbacks) does nothing more."""
    entry = checkpoint[CHECKPOINT_KEY]
    if PACKED_KEY in entry:
        return
    tensors, meta = quantized_tensors(model, _codes_of(model))
    data = export_bytes(tensors, meta)
    record = carried(model)
    if record is not None and record.activations:
        entry[ACTIVATIONS_KEY] = to_entry(record.activations)
    for key in set(checkpoint) - KEPT:
        del checkpoint[key]
    empty, empty_2d = torch.empty(0), torch.empty(0, 0)  # (0, 0) for 0-d entries: PyTorch indexes a (0,) one
    placeholders = {key: empty if value.dim() else empty_2d for key, value in model.state_dict().items()}
    checkpoint["state_dict"] = {**placeholders, SENTINEL: empty}
    entry[PACKED_KEY] = torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _codes_of(model: nn.Module) -> QuantizationResult:
    """The codes ``model`` carries, as the export writes them; weights no longer equal to their codes (edited after
    the fit) are dropped from the record and stored as the floats they are."""
    record = carried(model)
    if record is not None and (stale := record.stale(model)):
        warnings.warn(f"{stale[:5]} are no longer the codes {record.source} left (trained or edited since): the "
                      "compressed checkpoint stores them as float, and the model no longer carries their codes",
                      UserWarning, stacklevel=3)
        drop(model, stale)
    record = carried(model)  # what is left is checked: no second comparison of every weight with its codes
    return record_as_result(model, record) if record is not None else QuantizationResult()


def is_packed(checkpoint: dict[str, Any]) -> bool:
    entry = checkpoint.get(CHECKPOINT_KEY)
    return isinstance(entry, dict) and PACKED_KEY in entry


def unpack(
    model: nn.Module, checkpoint: dict[str, Any], source: str, declared: CompactedAxes | None = None
) -> dict[str, Tensor]:
    """The float ``state_dict`` of a packed checkpoint (``source`` names it in errors), checked against ``model``
    before anything is allocated; ``model`` is resized to its compacted shapes and carries its codes. Returns the
    state_dict to load (strictly: it holds exactly the model's keys). ``checkpoint["state_dict"]`` must be the
    placeholders :func:`pack` writes (checked by :func:`~.artifacts.prepare_for_checkpoint`: names to tensors).
    ``declared``: the compaction record the entry states beside the packed model, which must be the packed one's."""
    blob = checkpoint[CHECKPOINT_KEY][PACKED_KEY]
    where = f"{source} [{CHECKPOINT_KEY}.{PACKED_KEY}]"
    if not (isinstance(blob, Tensor) and blob.dtype == torch.uint8 and blob.dim() == 1 and blob.is_contiguous()):
        shown = f"{blob.dtype} {list(blob.shape)}" if isinstance(blob, Tensor) else type(blob).__name__
        raise UntrustedFileError(f"{source!r}: {CHECKPOINT_KEY}.{PACKED_KEY} must be a contiguous 1-D uint8 tensor "
                                 f"(the packed model's safetensors bytes), got {shown}")
    filled = next((key for key, value in checkpoint["state_dict"].items() if value.numel()), None)
    if filled is not None:  # edited by hand, or written by something else: the packed model would be loaded instead
        raise UntrustedFileError(f"{source!r}, key {filled!r}: holds a tensor of shape "
                                 f"{list(checkpoint['state_dict'][filled].shape)} in 'state_dict', but a compressed "
                                 f"checkpoint keeps its model in {CHECKPOINT_KEY}.{PACKED_KEY} and only empty "
                                 "placeholders in 'state_dict'")
    with tempfile.TemporaryDirectory(prefix="lightning_compress_") as directory:
        path = os.path.join(directory, "packed.safetensors")  # the export's checked reader reads a file
        with open(path, "wb") as handle:
            handle.write(blob.numpy().data)
        try:
            meta, floats, quantized = _read_checked(path, model, None)
        except UntrustedFileError as err:
            raise UntrustedFileError(str(err).replace(repr(path), repr(where)).replace(path, where)) from None
    ranges = from_entry(checkpoint[CHECKPOINT_KEY].get(ACTIVATIONS_KEY), set(quantized), f"{source!r}")
    if declared is not None and declared != meta[RECORD_KEY]:
        raise UntrustedFileError(f"{source!r}: {CHECKPOINT_KEY}.{RECORD_KEY} {encode(declared)!r:.300} is not the "
                                 f"packed model's compaction record {encode(meta[RECORD_KEY])!r:.300}: edited by hand?")
    state = {**floats, **{key: qt.dequantize() for key, qt in quantized.items()}}
    shrink_to_state_dict(model, state, meta[RECORD_KEY], source=where)
    forget(model)  # the model will hold exactly what the checkpoint holds
    if quantized:
        attach(model, quantized, f"load_compressed({source!r})").activations.update(ranges)
    return state


def refuse_resume(checkpoint: dict[str, Any], source: str) -> None:
    """``Trainer.fit(ckpt_path=compressed.ckpt)``: refused, naming the checkpoints to resume from."""
    entry = checkpoint.get(CHECKPOINT_KEY)
    if isinstance(entry, dict) and entry.get("stage") == "compressed":
        raise ValueError(
            f"`ckpt_path` {source!r} is the compressed model delivered at the end of a fit (stage 'compressed': "
            "packed codes, no optimizer or pruning state), not a checkpoint to resume training from; allowed: a "
            "checkpoint written during training (ModelCheckpoint's `last.ckpt` or best checkpoint, stage "
            "'training'), or no ckpt_path. To evaluate it: trainer.test / validate / predict(model, ckpt_path=...) "
            "or lightning_compress.load_compressed(model, path)"
        )
