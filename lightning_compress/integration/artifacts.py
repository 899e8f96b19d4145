"""Every artifact this package writes, loaded the same way: :func:`load_compressed`.

Artifacts: a Lightning checkpoint written after compression (``compressed.ckpt``: compacted shapes, quantized values
and a ``"lightning_compress"`` entry that says so), a quantized export (``*.safetensors`` from
``PostTrainingQuantization`` / :func:`~lightning_compress.save_quantized`), a compacted model
(:func:`~lightning_compress.save_compacted`) and the float copy written before quantizing (``*.fp32.safetensors``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.io import read_safetensors_header

CHECKPOINT_KEY = "lightning_compress"
CHECKPOINT_FORMAT = "lightning_compress.checkpoint/1"


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
    those of the compressed model at the end of the fit."""
    kind = artifact_kind(path)
    if kind == "quantized":
        from lightning_compress.quantization.export import load_quantized
        from lightning_compress.structure.compaction import shrink_to_state_dict

        shrink_to_state_dict(model, _declared_shapes(path))  # a compacted model's export: its smaller shapes
        return load_quantized(model, path)
    if kind == "compacted":
        from lightning_compress.structure.compaction import load_compacted

        return load_compacted(model, path)
    if kind == "float":
        from safetensors.torch import load_file

        from lightning_compress.structure.compaction import shrink_to_state_dict

        state = load_file(str(path))
        shrink_to_state_dict(model, state)
        model.load_state_dict(state, strict=True)
        return model
    checkpoint = load_checkpoint(path)
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        raise ValueError(f"`path` {str(path)!r} is not a Lightning checkpoint (no 'state_dict' entry)")
    prepare_for_checkpoint(model, checkpoint)
    model.load_state_dict(state_dict, strict=True)
    return model


def prepare_for_checkpoint(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Resize ``model`` to the compacted shapes a compressed checkpoint holds (before its state is loaded)."""
    entry = checkpoint.get(CHECKPOINT_KEY)
    if isinstance(entry, dict) and entry.get("compacted"):
        from lightning_compress.structure.compaction import shrink_to_state_dict

        shrink_to_state_dict(model, checkpoint["state_dict"])


def _declared_shapes(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every state_dict entry of a quantized export with the shape it declares, as tensors on the meta device
    (shapes only, nothing allocated): quantized weights from the metadata, the rest from the header."""
    header = read_safetensors_header(path)
    layers = json.loads(header.metadata.get("lightning_compress", "{}")).get("layers", {})
    shapes = {key: tuple(entry.shape) for key, entry in header.tensors.items() if ":" not in key}
    shapes.update({key: tuple(layer["shape"]) for key, layer in layers.items() if isinstance(layer, dict)})
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, tensors only (``weights_only``), on the CPU."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"`path` {str(path)!r} could not be read as a checkpoint: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"`path` {str(path)!r} is not a Lightning checkpoint (not a dict)")
    return checkpoint
