"""plan_masks for structured pruning: heads go whole and are scored from their rows' gradient statistics, a MACs
target removes what costs compute, attention modules get parameter masks of their own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.pruning.config import PruningConfig
from lightning_compress.pruning.planner import expand_masks, plan_masks
from lightning_compress.pruning.statistics import GradientStatistics
from lightning_compress.pruning.tracked import TrackedLayers
from lightning_compress.structure.compaction import compact
from lightning_compress.structure.dependency import find_unit_groups, unit_weight
from lightning_compress.structure.macs import estimated_macs
from tests.structure.test_transformers import EncoderClassifier, bert


class UnitWeightLayers(TrackedLayers):
    """TrackedLayers reading each module's unit weight (in_proj_weight for attention): the change requested for
    the callback, so that attention modules are tracked like Linears."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules, self.shared = dict(modules), {}

    def weights(self) -> list[torch.Tensor]:
        return [unit_weight(m) for m in self.modules.values()]

    def num_units(self) -> dict[str, int]:
        return {n: int(unit_weight(m).shape[0]) for n, m in self.modules.items()}


def layers_of(model: nn.Module, names: list[str]) -> UnitWeightLayers:
    modules = dict(model.named_modules())
    return UnitWeightLayers({n: modules[n] for n in names})


def stats_with(layers: TrackedLayers, quiet_rows: dict[str, slice]) -> GradientStatistics:
    """Per-unit statistics of 8 steps of random gradients, zero on the listed rows."""
    weights = layers.weights()
    stats = GradientStatistics(layers.names, [w.shape for w in weights], per_weight=False, per_unit=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        grads = [torch.randn(w.shape, generator=generator) for w in weights]
        for g, name in zip(grads, layers.names):
            if name in quiet_rows:
                g[quiet_rows[name]] = 0
        stats.update(grads, weights)
    return stats


def test_bert_heads_go_whole_and_the_quiet_head_first() -> None:
    model, ids = bert(), torch.randint(0, 30, (2, 9))
    groups = find_unit_groups(model, ids)
    prefix = "bert.encoder.layer.0.attention.self"
    names = [f"{prefix}.query", f"{prefix}.key", f"{prefix}.value"]
    layers = layers_of(model, names)
    stats = stats_with(layers, {n: slice(16, 24) for n in names})  # head 2 has no gradient in q, k and v
    config = PruningConfig(sparsity=0.5, structured=True)
    _, units = plan_masks(config, model, layers, stats, {}, {}, groups, 0.25)
    head = torch.tensor([True, True, False, True]).repeat_interleave(8)
    assert all(torch.equal(units[n], head) for n in names)
    params, units = plan_masks(config, model, layers, stats, {}, units, groups, 0.5)
    kept = units[names[0]].view(4, 8)
    assert kept.all(1).sum() == 2 and (kept.all(1) | ~kept.any(1)).all()  # two whole heads
    assert params[f"{prefix}.value.weight"].shape == (32, 32)
    assert torch.equal(params["bert.encoder.layer.0.attention.output.dense.weight"][0], units[names[2]])


def test_attention_module_masks_and_compaction() -> None:
    model, x = EncoderClassifier(), torch.randint(0, 30, (2, 7))
    groups = find_unit_groups(model, x)
    names = ["encoder.layers.0.self_attn", "encoder.layers.0.linear1", "encoder.layers.1.linear1"]
    layers = layers_of(model, names)
    config = PruningConfig(sparsity=0.5, structured=True, criterion="magnitude")
    params, units = plan_masks(config, model, layers, None, {}, {}, groups, 0.5)
    heads = units["encoder.layers.0.self_attn"].view(3, 4, 8)
    assert (heads.all(2) | ~heads.any(2)).all() and torch.equal(heads[0], heads[2])
    assert params["encoder.layers.0.self_attn.in_proj_weight"].shape == (96, 32)
    assert torch.equal(params["encoder.layers.0.self_attn.out_proj.weight"][0], heads[0].flatten())
    removed = 1 - sum(int(units[n].sum()) for n in names) / (96 + 48 + 48)
    assert abs(removed - 0.5) < 0.05
    result = compact(model, units, x)
    assert result.params_after < result.params_before


def test_macs_target_prunes_the_expensive_channels() -> None:
    class TwoScales(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.high, self.low = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.high(x))
            return self.fc(torch.relu(self.low(nn.functional.max_pool2d(h, 4))).mean((2, 3)))

    torch.manual_seed(0)
    model, x = TwoScales(), torch.randn(2, 1, 16, 16)
    groups = find_unit_groups(model, x)
    layers = layers_of(model, ["high", "low"])
    config = PruningConfig(sparsity=0.5, structured=True, criterion="magnitude")
    _, by_units = plan_masks(config, model, layers, None, {}, {}, groups, 0.5)
    _, by_macs = plan_masks(config, model, layers, None, {}, {}, groups, 0.5, structured_target="macs")
    assert int(by_macs["high"].sum()) < int(by_units["high"].sum())  # the 16x16 channels go first
    dense = estimated_macs(groups, {})
    assert abs(1 - estimated_macs(groups, by_macs) / dense - 0.5) < 0.08
    assert 1 - estimated_macs(groups, by_macs) / dense > 1 - estimated_macs(groups, by_units) / dense


def test_unknown_structured_target_is_refused() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    config = PruningConfig(sparsity=0.5, structured=True, criterion="magnitude")
    with pytest.raises(ValueError, match=r"`structured_target` must be one of \['units', 'macs'\], got 'flops'"):
        plan_masks(config, model, TrackedLayers({"0": model[0]}), None, {}, {}, None, 0.5, structured_target="flops")


def test_expand_masks_without_groups_masks_rows_only() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    params = expand_masks(model, {"0": torch.tensor([True, False, True, True])}, None)
    assert set(params) == {"0.weight", "0.bias"} and params["0.weight"][1].sum() == 0


def test_round_counts_keeps_multiples_and_the_total() -> None:
    from lightning_compress.pruning.planner import round_counts

    counts = round_counts([60, 60, 60, 60], [64, 64, 64, 64], [1, 1, 1, 1], [1.0] * 4, 8)
    assert all(c % 8 == 0 for c in counts)
    assert sum(counts) == 240  # 16 units asked for go as two whole multiples, not rounded back to 256
    assert round_counts([3, 20], [16, 20], [1, 1], [1.0, 1.0], 8) == [8, 16]  # never below one multiple
    assert round_counts([3, 64], [16, 64], [1, 1], [1.0, 1.0], 8) == [8, 56]  # what the forced 8 keeps goes elsewhere
    assert round_counts([13], [13], [1], [1.0], 8) == [13]  # capped by what is still kept
    assert round_counts([9], [64], [40], [1.0], 8) == [40]  # the floor, rounded up to a multiple


def _resnet_like() -> tuple[nn.Module, torch.Tensor]:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
            self.c, self.fc = nn.Conv2d(64, 64, 3, padding=1), nn.Linear(64, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.b(torch.relu(self.a(x))))
            return self.fc(torch.relu(self.c(nn.functional.max_pool2d(h, 2))).mean((2, 3)))

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.c.weight.mul_(100)  # one layer's scores 100x the others'
    return model, torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("target", ["units", "macs"])
def test_round_to_keeps_channel_counts_multiples_of_8(target: str) -> None:
    model, x = _resnet_like()
    groups = find_unit_groups(model, x)
    layers = layers_of(model, ["a", "b", "c"])
    config = PruningConfig(sparsity=0.5, structured=True, criterion="magnitude", round_to=8, normalize="mean")
    unit_masks: dict[str, torch.Tensor] = {}
    for step in (0.1, 0.2, 0.3, 0.4, 0.5):  # a gradual schedule: small steps still remove whole multiples
        _, unit_masks = plan_masks(config, model, layers, None, {}, unit_masks, groups, step, structured_target=target)
        assert all(int(k.sum()) % 8 == 0 for k in unit_masks.values()), {n: int(k.sum()) for n, k in unit_masks.items()}
    if target == "units":
        removed = 1 - sum(int(k.sum()) for k in unit_masks.values()) / 160
    else:
        removed = 1 - estimated_macs(groups, unit_masks) / estimated_macs(groups, {})
    assert abs(removed - 0.5) < 0.15


def test_normalised_scores_keep_every_layer_above_its_floor() -> None:
    model, x = _resnet_like()
    groups = find_unit_groups(model, x)
    layers = layers_of(model, ["a", "b", "c"])
    raw = PruningConfig(sparsity=0.5, structured=True, criterion="magnitude")
    _, by_raw = plan_masks(raw, model, layers, None, {}, {}, groups, 0.5)
    assert int(by_raw["c"].sum()) == 64  # raw scale: the loud layer keeps all its units
    config = PruningConfig(sparsity=0.5, structured=True, criterion="magnitude", normalize="mean", min_keep=0.25)
    for target in ("units", "macs"):
        _, keep = plan_masks(config, model, layers, None, {}, {}, groups, 0.5, structured_target=target)
        for name, k in keep.items():
            assert int(k.sum()) >= 0.25 * k.numel(), (target, name, int(k.sum()))
        if target == "units":
            assert int(keep["c"].sum()) < 64  # ranked against its own layer, the loud layer loses units too


def test_new_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="normalize"):
        PruningConfig(structured=True, normalize="max")
    with pytest.raises(ValueError, match="round_to"):
        PruningConfig(structured=True, round_to=0)
    with pytest.raises(ValueError, match="macs_exponent"):
        PruningConfig(structured=True, macs_exponent=2.0)


def test_layer_targets_prune_each_layer_to_its_own_sparsity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    layers = TrackedLayers({"0": model[0], "2": model[2]})
    config = PruningConfig(sparsity=0.9, criterion="magnitude", scope="layer")
    masks, units = plan_masks(config, model, layers, None, {}, {}, None, 0.9, layer_targets={"0": 0.75, "2": 0.0})
    assert units == {}
    assert int(masks["0.weight"].sum()) == 32 and bool(masks["2.weight"].all())
    weight = model[0].weight.detach().abs().flatten()
    assert float(weight[masks["0.weight"].flatten()].min()) >= float(weight[~masks["0.weight"].flatten()].max())


@pytest.mark.parametrize(("structured", "targets", "match"), [
    (False, {"0": 0.5}, r"one sparsity per tracked layer \['0', '2'\]"),
    (True, {"0": 0.5, "2": 0.5}, r"of unstructured pruning, got \['0', '2'\] with structured=True"),
])
def test_layer_targets_are_refused_where_they_cannot_apply(structured: bool, targets: dict, match: str) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    config = PruningConfig(sparsity=0.5, structured=structured, criterion="magnitude")
    with pytest.raises(ValueError, match=match):
        plan_masks(config, model, TrackedLayers({"0": model[0], "2": model[2]}), None, {}, {}, None, 0.5,
                   layer_targets=targets)
