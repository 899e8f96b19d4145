"""compact / unit_masks_from_weights / save_compacted / load_compacted: the compacted model computes what the masked
model computes, with exactly the parameters expected, and reloads into a fresh instance."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lightning_compress.structure.compaction as compaction
from lightning_compress.demos.models import MLPClassifier, SmallCNN
from lightning_compress.structure.compaction import (
    compact,
    count_parameters,
    load_compacted,
    save_compacted,
    shrink_to_state_dict,
    unit_masks_from_weights,
)
from lightning_compress.structure.dependency import find_unit_groups
from lightning_compress.structure.shape_rules import compacted_axes
from tests.structure.test_dependency import Branchy, Concat, Depthwise, Mixed, Refusing, Residual


def keep(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def masked(model: nn.Module, masks: dict[str, torch.Tensor], example: torch.Tensor) -> nn.Module:
    """What the pruning callback leaves: pruned producer rows and bias zeroed, and the followers' weight and bias."""
    model = copy.deepcopy(model)
    groups = find_unit_groups(model, example)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            for layer in [name, *groups[name].followers]:
                for p in (modules[layer].weight, modules[layer].bias):
                    p[~mask] = 0
    return model


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                for t in (module.weight, module.bias, module.running_mean):
                    t.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model


def cnn_parameters(c1: int, c2: int, hidden: int, side: int = 2) -> int:
    convs = (9 * c1 + c1 + 2 * c1) + (9 * c1 * c2 + c2 + 2 * c2)  # conv weight + bias, BatchNorm weight + bias
    return convs + (c2 * side * side * hidden + hidden) + (hidden * 10 + 10)


# ---------------------------------------------------------------------------- outputs and counts
def test_mlp_outputs_and_parameter_count() -> None:
    model, x = MLPClassifier(input_size=64, hidden=[32, 16]), torch.randn(5, 64)
    masks = {"net.1": torch.arange(32) % 3 != 0, "net.3": torch.arange(16) < 10}  # keep 21 and 10
    result = compact(model, masks, x)
    assert result.units == {"net.1": (32, 21), "net.3": (16, 10), "net.5": (10, 10)}
    assert result.params_before == count_parameters(model) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert result.params_after == count_parameters(result.model) == 64 * 21 + 21 + 21 * 10 + 10 + 10 * 10 + 10
    assert (result.model.net[3].in_features, result.model.net[3].out_features) == (21, 10)
    torch.testing.assert_close(outputs(result.model, x), outputs(masked(model, masks, x), x), atol=1e-5, rtol=0)
    assert result.skipped == {} and "net.1 32->21" in str(result)


def test_small_cnn_batchnorm_followers_and_flatten_repeat() -> None:
    model, x = randomize_batchnorm(SmallCNN(image_size=8, channels=[4, 6], hidden=8)), torch.rand(3, 1, 8, 8)
    masks = {"net.0": keep(1, 0, 1, 1), "net.4": keep(0, 1, 1, 0, 0, 1), "net.9": torch.arange(8) < 5}
    result = compact(model, masks, x)
    net = result.model.net
    assert (net[1].num_features, net[1].running_mean.shape, net[4].weight.shape) == (3, (3,), (3, 3, 3, 3))
    assert (net[9].in_features, net[9].out_features, net[11].in_features) == (3 * 4, 5, 5)
    assert result.params_before == cnn_parameters(4, 6, 8)
    assert result.params_after == count_parameters(result.model) == cnn_parameters(3, 3, 5)
    reference = outputs(masked(model, masks, x), x)
    torch.testing.assert_close(outputs(result.model, x), reference, atol=1e-5, rtol=0)
    assert not torch.allclose(reference, outputs(model, x), atol=1e-3)  # the masks did change the model


def test_residual_units_go_only_when_every_coupled_producer_drops_them() -> None:
    model, x = randomize_batchnorm(Residual()), torch.randn(2, 3, 8, 8)
    masks = {"stem": keep(1, 1, 1, 0, 0, 1), "conv2": keep(1, 0, 1, 0, 1, 1), "conv1": keep(1, 0, 1, 1, 1)}
    pruned = masked(model, masks, x)  # zeroes units 1, 3, 4 of the stem / conv2 channels
    result = compact(pruned, masks, x)
    assert result.units["stem"] == result.units["conv2"] == (6, 5)  # only unit 3 is dropped by both
    m = result.model
    assert (m.bn0.num_features, m.bn2.num_features, m.conv1.in_channels, m.head.in_features) == (5, 5, 5, 5)
    assert (m.conv1.out_channels, m.bn1.num_features, m.conv2.in_channels) == (4, 4, 4)
    torch.testing.assert_close(outputs(m, x), outputs(pruned, x), atol=1e-5, rtol=0)


def test_concat_offsets() -> None:
    model, x = Concat(), torch.randn(2, 2, 8, 8)
    masks = {"a": keep(0, 1, 1), "b": keep(1, 1, 0, 1), "mix": keep(1, 1, 0, 1, 0)}
    result = compact(model, masks, x)
    assert (result.model.mix.in_channels, result.model.mix.out_channels, result.model.fc.in_features) == (5, 3, 48)
    assert torch.equal(result.model.mix.weight, model.mix.weight[[0, 1, 3]][:, [1, 2, 3, 4, 6]])
    torch.testing.assert_close(outputs(result.model, x), outputs(masked(model, masks, x), x), atol=1e-5, rtol=0)


def test_transposed_units_and_batchnorm1d() -> None:
    model, x = Mixed(), torch.randn(3, 3, 4)
    with torch.no_grad():
        model.bn.bias.normal_()
        model.bn.running_mean.normal_()
    masks = {"conv": keep(1, 0, 1, 1, 0), "fc1": keep(0, 1, 1, 0, 1, 1)}
    pruned = masked(model, masks, x)
    result = compact(pruned, masks, x)
    m = result.model
    assert (m.fc1.weight.shape, m.bn.num_features, m.fc2.in_features) == ((4, 3), 4, 16)
    torch.testing.assert_close(outputs(result.model, x), outputs(pruned, x), atol=1e-5, rtol=0)


def test_unprunable_layers_are_kept_and_listed() -> None:
    model, x = Depthwise(), torch.randn(2, 2, 6, 6)
    masks = {"expand": keep(1, 0, 1, 1), "project": keep(0, 1, 1), "fc": keep(1, 0)}
    result = compact(model, masks, x)
    assert result.units["expand"] == (4, 4) and result.units["project"] == (3, 2) and result.units["fc"] == (2, 2)
    assert result.skipped == {"expand": find_unit_groups(model, x)["expand"].reason, "fc": "model output"}
    assert "groups=4" in result.skipped["expand"]
    branchy = compact(Branchy(), {"fc1": torch.arange(8) < 4, "fc2": keep(1, 0)}, torch.randn(2, 4))
    assert branchy.units == {"fc1": (8, 4), "fc2": (2, 2)} and branchy.skipped == {"fc2": "model output"}


def test_inplace_and_copy() -> None:
    model, x = MLPClassifier(input_size=8, hidden=[6]), torch.randn(2, 8)
    copied = compact(model, {"net.1": torch.arange(6) < 3}, x)
    assert copied.model is not model and model.net[1].out_features == 6
    same = compact(model, {"net.1": torch.arange(6) < 3}, x, inplace=True)
    assert same.model is model and model.net[1].weight.shape == (3, 8)


def test_compacted_model_trains() -> None:
    model, x = SmallCNN(image_size=8, channels=[4, 6], hidden=8), torch.rand(4, 1, 8, 8)
    result = compact(model, {"net.4": keep(1, 0, 1, 0, 1, 0)}, x)
    loss = result.model.train()(x).square().mean()
    loss.backward()
    assert result.model.net[9].weight.grad.shape == (8, 12)


# ---------------------------------------------------------------------------- masks read off the weights
def test_unit_masks_from_weights_needs_zero_followers_too() -> None:
    model, x = randomize_batchnorm(SmallCNN(image_size=8, channels=[4, 6], hidden=8)), torch.rand(2, 1, 8, 8)
    masks = {"net.0": keep(1, 0, 1, 0), "net.9": torch.arange(8) % 2 == 0}
    pruned = masked(model, masks, x)
    with torch.no_grad():
        pruned.net[5].weight[2] = 0
        pruned.net[4].weight[2] = 0
        pruned.net[4].bias[2] = 0  # producer row zero, but the BatchNorm bias still shifts the channel: alive
    derived = unit_masks_from_weights(pruned, find_unit_groups(pruned, x))
    assert torch.equal(derived["net.0"], masks["net.0"]) and torch.equal(derived["net.9"], masks["net.9"])
    assert bool(derived["net.4"].all()) and bool(derived["net.11"].all())
    result = compact(pruned, derived, x)
    assert result.params_after == cnn_parameters(2, 6, 4)
    torch.testing.assert_close(outputs(result.model, x), outputs(pruned, x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- errors and the safety net
@pytest.mark.parametrize(
    ("masks", "error", "match"),
    [
        ({"net.1": torch.zeros(6, dtype=torch.bool)}, ValueError, r"`unit_masks\['net.1'\]` keeps no unit"),
        ({"net.9": torch.ones(6, dtype=torch.bool)}, ValueError, r"names 'net.9', which is not a Linear / Conv layer"),
        ({"net.1": torch.ones(5, dtype=torch.bool)}, ValueError, r"shape \(6,\), got torch.bool tensor of shape \(5"),
        ({"net.1": torch.ones(6)}, ValueError, r"must be a bool tensor .* got torch.float32 tensor"),
        ({"net.1": [True] * 6}, ValueError, r"must be a bool tensor .* got list"),
    ],
)
def test_mask_errors(masks: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        compact(MLPClassifier(input_size=8, hidden=[6]), masks, torch.randn(2, 8))


def test_a_wrong_analysis_is_caught_and_rolled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = SmallCNN(image_size=8, channels=[4, 6], hidden=8), torch.rand(2, 1, 8, 8)
    groups = find_unit_groups(model, x)
    groups["net.4"].consumers = [("net.9", 1, 0)]  # a wrong repeat: the Linear gets the wrong input width
    monkeypatch.setattr(compaction, "find_unit_groups", lambda *_, **__: groups)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"compaction changed the model's outputs .the compacted model raised"):
        compact(model, {"net.4": keep(1, 0, 1, 1, 1, 1)}, x, inplace=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.net[9].in_features == 24

    sigmoid, x = Refusing("sigmoid"), torch.randn(2, 4)  # pretend sigmoid(0) = 0.5 were followable
    groups = find_unit_groups(sigmoid, x)
    groups["fc1"].prunable, groups["fc1"].reason, groups["fc1"].consumers = True, "", [("fc2", 1, 0)]
    with pytest.raises(RuntimeError, match=r"compaction changed the model's outputs .max abs difference"):
        compact(sigmoid, {"fc1": torch.arange(8) < 6}, x, inplace=True)
    assert sigmoid.fc1.out_features == sigmoid.fc2.in_features == 8
    groups["fc1"].consumers = [("fc2", 2, 4)]
    with pytest.raises(RuntimeError, match="group of 'fc1' maps units past the 8 inputs of 'fc2'"):
        compact(sigmoid, {"fc1": torch.arange(8) < 6}, x, inplace=True)


# ---------------------------------------------------------------------------- saving and loading
def test_save_and_load_into_a_fresh_instance(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, x = randomize_batchnorm(SmallCNN(image_size=8, channels=[4, 6], hidden=8)), torch.rand(2, 1, 8, 8)
    result = compact(model, {"net.0": keep(1, 0, 1, 1), "net.4": keep(0, 1, 1, 0, 0, 1)}, x)
    path = tmp_path / "small.safetensors"
    save_compacted(result.model, path)
    assert os.listdir(tmp_path) == ["small.safetensors"]  # no temporary file left behind
    fresh = load_compacted(SmallCNN(image_size=8, channels=[4, 6], hidden=8), path)
    assert count_parameters(fresh) == result.params_after
    torch.testing.assert_close(outputs(fresh, x), outputs(result.model, x), atol=0, rtol=0)

    other = shrink_to_state_dict(SmallCNN(image_size=8, channels=[4, 6], hidden=8), result.model.state_dict(),
                                 compacted_axes(result.model))
    other.load_state_dict(result.model.state_dict(), strict=True)
    torch.testing.assert_close(outputs(other, x), outputs(result.model, x), atol=0, rtol=0)


def test_load_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match=r"`path` '.*missing.safetensors' does not exist"):
        load_compacted(nn.Linear(2, 2), tmp_path / "missing.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, plain)
    with pytest.raises(ValueError, match="was not written by save_compacted"):
        load_compacted(nn.Linear(2, 2), plain)
    with pytest.raises(ValueError, match=r"'state_dict', key 'weight': declared shape \[2, 2\], the model has "):
        shrink_to_state_dict(nn.Conv2d(2, 2, 3), {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)},
                             {"weight": {0: 2}})
