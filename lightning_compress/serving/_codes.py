"""Where ``export_onnx`` gets a quantized model's integer codes. No Lightning.

In order: ``result`` when given (a :class:`QuantizationResult`, a key -> :class:`QuantizedTensor` mapping or a
``save_quantized`` file); otherwise what the model carries (:mod:`lightning_compress.quantization.carried`: the
model's own record and its submodules', whose keys are prefixed with the submodule's name); plus the codes of
``Int8Linear`` layers. A carried record whose weights changed since is refused, naming the keys. A model that
carries nothing is exported as float -- never guessed quantized from how its weights look.

``result`` keys are matched to the model's ``state_dict`` as given, or after adding / stripping one wrapper prefix
(the codes of ``model.bert`` exported through ``model``, or the other way round). A file is read with the model's
shapes as its bound (the model, or the submodule / a wrapper of it that its keys name): a fully pruned layer stores
its metadata alone, so read without a model only the file's size bounds the shapes it may declare, and a large one
is refused there although the model it belongs to is at hand.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from lightning_compress.core.io import read_safetensors_header
from lightning_compress.quantization.carried import carried
from lightning_compress.quantization.functional import QuantizationResult
from lightning_compress.quantization.kernels import Int8Linear
from lightning_compress.quantization.primitives import QuantizedTensor, QuantSpec

Codes = dict[str, tuple[str, QuantizedTensor]]  # module name -> (state-dict key, codes)
V = TypeVar("V")


def from_result(result: Any, model: nn.Module | None = None) -> dict[str, QuantizedTensor] | None:
    """The codes ``result`` holds, by its own keys (None for None); a file is read bounded by ``model``'s shapes."""
    if result is None:
        return None
    if isinstance(result, QuantizationResult):
        return {layer.key: layer.qtensor for layer in result.layers.values()}
    if isinstance(result, (str, os.PathLike)):
        from lightning_compress.quantization.export import load_quantized_tensors

        return dict(load_quantized_tensors(result, None if model is None else saved_from(result, model))[1])
    if isinstance(result, Mapping):
        return dict(result)
    raise TypeError("`result` must be a QuantizationResult, a mapping of state-dict keys to QuantizedTensor, "
                    f"a save_quantized file path, or None; got {type(result).__name__}")


def saved_from(path: str | os.PathLike[str], model: nn.Module) -> nn.Module | None:
    """The module whose ``state_dict`` the file's keys are: ``model``, its submodule (the file's keys lack that
    prefix) or ``model`` inside wrappers (they carry one); None when they are none of these (read without a model:
    :func:`collect` then names the key that is not the model's). Only the header is read here."""
    keys = list(dict.fromkeys(key.partition(":")[0] for key in read_safetensors_header(path).tensors))
    try:
        moved = list(match_keys(dict.fromkeys(keys), model.state_dict()))
    except ValueError:
        return None
    changed = [(key, new) for key, new in zip(keys, moved) if key != new]
    if not changed:
        return model
    key, new = changed[0]
    if new.endswith("." + key):  # the file is a submodule's (a prefix added to every key)
        return model.get_submodule(new[: -len(key) - 1])
    if len(changed) < len(keys):
        return None  # only some keys carry the wrapper's prefix: no module is the file's
    outer = node = nn.Module()  # the file is a wrapper's: the model at the path its keys carry
    *parents, last = key[: -len(new) - 1].split(".")
    for name in parents:
        node.add_module(name, nn.Module())
        node = node.get_submodule(name)
    node.add_module(last, model)
    return outer


def from_model(model: nn.Module) -> tuple[dict[str, QuantizedTensor], str]:
    """What ``model`` and its submodules carry, keys relative to ``model`` (an outer record wins over an inner one
    for the same weight); refuses a stale record."""
    codes: dict[str, QuantizedTensor] = {}
    sources = []
    for name, module in model.named_modules():
        record = carried(module)
        if record is None:
            continue
        prefix = f"{name}." if name else ""
        # swapped to Int8Linear since (those layers carry their own codes), or covered by an outer record (the
        # model quantized again as a whole after a part of it was)
        own = _int8_owned(module) | {key for key in record.codes if prefix + key in codes}
        stale = [key for key in record.stale(module) if key not in own]
        if stale:
            shown = [prefix + key for key in stale]
            raise ValueError(f"`model` carries quantized codes ({record.source}) that no longer match its weights: "
                             f"{shown[:8]}{' ...' if len(shown) > 8 else ''} changed since (trained, restored to "
                             "float or edited); quantize it again, or pass `result=` for the weights it has now")
        for key, qt in record.codes.items():
            if key not in own:
                codes.setdefault(prefix + key, qt)
        sources.append(f"{name or 'model'}: {record.source}")
    return codes, "; ".join(sources)


def _int8_owned(model: nn.Module) -> set[str]:
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def match_keys(by_key: Mapping[str, V], state: Mapping[str, Any]) -> dict[str, V]:
    """``by_key`` re-keyed onto ``state``: as given, or with one wrapper prefix added or stripped (the same for
    every key)."""
    if all(key in state for key in by_key):
        return dict(by_key)
    first = next(key for key in by_key if key not in state)
    parts = first.split(".")
    options = [("strip", ".".join(parts[:i]) + ".") for i in range(1, len(parts)) if ".".join(parts[i:]) in state]
    options += [("add", s[: -len(first)]) for s in state if s.endswith("." + first)]
    for how, prefix in options:
        moved = {(key[len(prefix):] if how == "strip" and key.startswith(prefix) else
                  prefix + key if how == "add" else key): qt for key, qt in by_key.items()}
        if all(key in state for key in moved):
            return moved
    raise ValueError(f"`result` has a weight {first!r} that is not in the model's state_dict (also not after adding "
                     "or removing a wrapper's prefix): wrong model?")


def collect(model: nn.Module, result: Any) -> tuple[Codes, str]:
    """module name -> (state-dict key, codes), and where they came from. Replaces ``Int8Linear`` layers in
    ``model`` (the export copy) by float Linears holding their dequantized weights."""
    given = from_result(result, model)
    state = model.state_dict()
    if given is not None:
        by_key, source = match_keys(given, state), "result"
    else:
        by_key, source = from_model(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            qweight, scale, bias = module.qweight, module.weight_scale, module.bias
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight())
                if bias is not None:
                    linear.bias.copy_(bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
            qt = QuantizedTensor(qweight.clone(), scale.reshape(-1, 1).clone(), None, QuantSpec(bits=8),
                                 tuple(qweight.shape), torch.float32)
            by_key.setdefault(f"{name}.weight", qt)
            source = source or "Int8Linear layers"
    state = model.state_dict()
    codes: Codes = {}
    for key, qt in by_key.items():
        weight = state[key].detach().float().cpu()
        if weight.shape != qt.shape or not torch.equal(weight, qt.dequantize().float().cpu()):
            raise ValueError(f"`result` does not describe `model`: {key!r} is not the dequantized codes; pass the "
                             "model quantize() changed in place (or the one load_quantized() returned)")
        codes[key.rpartition(".")[0]] = (key, qt)
    return codes, source
