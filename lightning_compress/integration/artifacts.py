"""Every artifact this package writes, loaded the same way: :func:`load_compressed`.

Artifacts: a Lightning checkpoint written after compression (``compressed.ckpt``: the packed model under its
``"lightning_compress"`` entry, see :mod:`.compressed_checkpoint`; older ones hold the float ``state_dict``), a
quantized export (``*.safetensors`` from ``PostTrainingQuantization`` / :func:`~lightning_compress.save_quantized`),
a compacted model (:func:`~lightning_compress.save_compacted`) and the float copy written before quantizing
(``*.fp32.safetensors``).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.io import UntrustedFileError, read_safetensors_header
from lightning_compress.integration.compressed_checkpoint import CHECKPOINT_KEY, is_packed, unpack
from lightning_compress.structure.serialization import shrink_to_state_dict
from lightning_compress.structure.shape_rules import RECORD_KEY, CompactedAxes, parse_record

CHECKPOINT_FORMAT = "lightning_compress.checkpoint/2"  # 2: a compressed checkpoint holds the packed model


def checkpoint_entry(stage: str, **details: Any) -> dict[str, Any]:
    """What a checkpoint says about compression: ``stage`` is ``"training"`` (pruning masks in progress, float
    weights: a checkpoint to resume from) or ``"compressed"`` (the delivered model)."""
    return {"format": CHECKPOINT_FORMAT, "stage": stage, **details}


def read_checkpoint_entry(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``lightning_compress`` entry of a Lightning checkpoint (None if it has none)."""
    checkpoint = load_checkpoint(path)
    entry = checkpoint.get(CHECKPOINT_KEY)
    return entry if isinstance(entry, dict) else None


def artifact_kind(path: str | os.PathLike[str]) -> str:
    """``"checkpoint"``, ``"quantized"``, ``"compacted"`` or ``"float"``; a ValueError names the file otherwise."""
    name = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"`path` {name!r} does not exist or is not a file")
    if not name.endswith(".safetensors"):
        return "checkpoint"
    metadata = read_safetensors_header(path).metadata
    text = json.dumps(metadata)
    if "lightning-compress/float" in text:
        return "float"
    if "lightning_compress.compacted" in text or "compacted" in metadata.get("format", ""):
        return "compacted"
    if "lightning-compress" in text or "lightning_compress" in text:
        return "quantized"
    raise ValueError(f"`path` {name!r} is a safetensors file that lightning_compress did not write (metadata "
                     f"{sorted(metadata)}); allowed: a quantized export, a compacted model, a float copy, a .ckpt")


def load_compressed(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load any artifact of this package into a freshly built ``model`` (the same class and arguments as the one
    trained, a LightningModule or a plain module), rebuilding compacted shapes; returns ``model``. Outputs equal
    those of the compressed model at the end of the fit.

    The model decides, not the file (:mod:`lightning_compress.structure.shape_rules`): a file may only shrink the
    axes its compaction record lists, a checkpoint's ``hyper_parameters`` must be the model's, and every check runs
    before the model is resized or a tensor allocated; a refusal leaves the model as it was. A checkpoint from
    before compression (``last.ckpt`` of ``ModelCheckpoint``, a plain Lightning checkpoint) is refused, naming the
    file to load instead. A float copy whose quantized export beside it is of another run is refused."""
    name = os.fspath(path)
    kind = artifact_kind(name)
    if kind == "quantized":
        from lightning_compress.quantization.export import load_quantized

        _check_float_copy_beside(name)
        return load_quantized(model, name)
    if kind == "compacted":
        from lightning_compress.structure.serialization import load_compacted

        return load_compacted(model, name)
    if kind == "float":
        from lightning_compress.quantization.export import check_same_run, load_float

        export = name.removesuffix(".fp32.safetensors") + ".safetensors"
        if export != name and Path(export).is_file() and artifact_kind(export) == "quantized":
            check_same_run(export, name)  # the float copy of another run than the export beside it: refused
        return load_float(model, name)
    checkpoint = load_checkpoint(name)
    entry = _entry(name, checkpoint)
    stage = entry.get("stage") if entry is not None else None
    if stage != "compressed":
        raise ValueError(_not_compressed(name, stage))
    state_dict = prepare_for_checkpoint(model, checkpoint, source=name)
    model.load_state_dict(state_dict, strict=True)
    return model


def prepare_for_checkpoint(
    model: nn.Module, checkpoint: dict[str, Any], source: str | None = None
) -> dict[str, torch.Tensor]:
    """Check a Lightning checkpoint (``source`` names it in errors) against ``model`` and resize the model to the
    compacted shapes it holds, before its state is loaded (by :func:`load_compressed`, by Lightning for a
    ``ckpt_path`` with our callbacks in the Trainer, by the CLI). Checked first, in this order: the ``state_dict``
    maps names to tensors; the ``hyper_parameters`` equal the model's ``hparams`` (where both have the key); the
    shapes follow the one shape rule under the entry's compaction record. A packed compressed checkpoint
    (:mod:`.compressed_checkpoint`) is unpacked: its ``state_dict`` becomes the rebuilt float weights (in
    ``checkpoint`` too, for Lightning to load) and the model carries its codes. Returns the ``state_dict``."""
    if source is None:  # Lightning's ckpt_path when it is Lightning that loads the checkpoint
        source = str(getattr(getattr(model, "_trainer", None), "ckpt_path", None) or "the checkpoint")
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state_dict.items()
    ):
        raise UntrustedFileError(f"{source!r}: 'state_dict' must map names to tensors, got "
                                 f"{type(state_dict).__name__}: not a Lightning checkpoint of a model")
    _check_hyperparameters(source, checkpoint.get("hyper_parameters"), model)
    entry = _entry(source, checkpoint)
    record: CompactedAxes | None = {}
    if entry is not None and entry.get("stage") == "compressed":
        if RECORD_KEY in entry:
            record = parse_record(source, entry[RECORD_KEY], f"{CHECKPOINT_KEY}.{RECORD_KEY}")
        elif entry.get("compacted"):
            record = None  # compacted by a version that did not record the axes: nothing may shrink
        if is_packed(checkpoint):
            checkpoint["state_dict"] = unpack(model, checkpoint, source, record if RECORD_KEY in entry else None)
            return checkpoint["state_dict"]
    shrink_to_state_dict(model, state_dict, record, source=source)
    return state_dict


def _entry(source: str, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    entry = checkpoint.get(CHECKPOINT_KEY)
    if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("stage"), str)):
        raise UntrustedFileError(f"{source!r}: the {CHECKPOINT_KEY!r} entry must be an object with a 'stage' string, "
                                 f"got {entry!r:.200}")
    return entry


def _check_hyperparameters(source: str, saved: Any, model: nn.Module) -> None:
    """A checkpoint of another configuration (``hidden=[8, 4]``, ``input_size=784``) is refused by name."""
    current = getattr(model, "hparams", None)
    if saved is None or not isinstance(current, Mapping):
        return
    if not isinstance(saved, Mapping):
        raise UntrustedFileError(f"{source!r}: 'hyper_parameters' must be a mapping, got {type(saved).__name__}")
    for key in sorted(set(saved) & set(current), key=str):
        if str(key).startswith("_"):  # Lightning's / the CLI's bookkeeping (_instantiator, _class_path)
            continue
        if not _same(saved[key], current[key]):
            raise UntrustedFileError(
                f"{source!r}: hyper-parameter {key!r} is {saved[key]!r:.100} in the checkpoint but "
                f"{current[key]!r:.100} in the model ({type(model).__name__}): a checkpoint of another configuration; "
                "build the model with the checkpoint's arguments (`checkpoint['hyper_parameters']`)"
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # e.g. tensors of other shapes: compared by what they print
        return repr(a) == repr(b)


def _not_compressed(name: str, stage: str | None) -> str:
    """What a checkpoint from before compression is, and which file to load instead."""
    what = (f"a checkpoint written during training (its {CHECKPOINT_KEY!r} entry says stage {stage!r}: float "
            "weights, pruning in progress)" if stage else
            f"a Lightning checkpoint with no {CHECKPOINT_KEY!r} compressed entry (float weights, original shapes)")
    here = Path(name).resolve().parent
    found = [str(candidate) for candidate in (here / "compressed.ckpt", here.parent / "compressed.ckpt")
             if candidate.is_file()]
    instead = (f"load {found[0]!r}" if found else
               "load the fit's `compressed.ckpt` (in the run's log directory) or its export (*.safetensors)")
    return (f"`path` {name!r} is {what}, not a compressed model: {instead}. To resume or evaluate the float model, "
            "use `Trainer.fit(ckpt_path=...)` / `model.load_state_dict(...)` instead of load_compressed")


def _check_float_copy_beside(name: str) -> None:
    """Warn when the float copy beside a quantized export is of another run (restoring float from it would be
    wrong)."""
    from lightning_compress.quantization.export import read_run_id

    beside = name.removesuffix(".safetensors") + ".fp32.safetensors"
    if not Path(beside).is_file():
        return
    ours, theirs = read_run_id(name), read_run_id(beside)
    if ours is None or ours != theirs:
        warnings.warn(f"{beside!r} (run_id {theirs!r}) beside {name!r} (run_id {ours!r}) is the float copy of "
                      "another run: do not use it as this export's float weights", UserWarning, stacklevel=3)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, tensors only (``weights_only``), on the CPU. A file torch cannot read that
    way is refused by what it is not (torch's own advice to load it unsafely is never passed on)."""
    name = os.fspath(path)
    allowed = ("allowed: a Lightning checkpoint (`compressed.ckpt`) or a .safetensors file this package wrote "
               "(quantized export, compacted model, float copy)")
    try:
        checkpoint = torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        what = ("holds Python objects other than tensors and plain values, which a safe (weights-only) load refuses"
                if zipfile.is_zipfile(name) else "is not a checkpoint written by torch.save"
                + (" (an ONNX model is for ONNX Runtime)" if name.endswith(".onnx") else ""))
        raise UntrustedFileError(f"`path` {name!r} {what}; {allowed}") from None
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as err:
        raise UntrustedFileError(f"`path` {name!r} could not be read as a checkpoint ({type(err).__name__}: truncated "
                                 f"or not written by torch.save); {allowed}") from None
    if not isinstance(checkpoint, dict):
        raise UntrustedFileError(f"`path` {name!r} is not a Lightning checkpoint (it holds a "
                                 f"{type(checkpoint).__name__}, not a dict); {allowed}")
    return checkpoint
