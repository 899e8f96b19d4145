"""Structured candidates (adaptive/units.py): kept counts, per-unit Fisher scores, and compaction of a plan equal to
the masked model."""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.adaptive.units import (
    families,
    family_candidates,
    keep_mask,
    kept_counts,
    masked_copy,
    unit_masks,
    unit_scores,
)
from lightning_compress.demos.models import SmallCNN
from lightning_compress.structure.compaction import compact
from lightning_compress.structure.dependency import find_unit_groups


def test_kept_counts_round_to_multiples_of_eight_where_the_family_is_wide() -> None:
    assert kept_counts(64) == [64, 56, 48, 40, 32, 24, 16]
    assert kept_counts(16) == [16, 14, 12, 10, 8, 6, 4]  # too narrow to round: the fractions as they are
    assert kept_counts(10) == [10, 9, 8, 6, 5, 4, 2]
    assert kept_counts(1) == [1]


def test_scores_sum_the_removed_units_lowest_first() -> None:
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5])
    candidates = family_candidates("fc", scores)
    by_kept = {c.kept: c.score for c in candidates}
    assert by_kept[4] == 0.0 and by_kept[3] == 0.5 and by_kept[2] == 1.5 and by_kept[1] == 4.5
    assert keep_mask(scores, 2).tolist() == [True, False, True, False]


def test_unit_score_is_half_fisher_times_weight_squared_over_the_producer_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    groups = find_unit_groups(model, torch.randn(2, 2, 6, 6))
    members = families(groups)
    assert list(members) == ["0"]  # the output layer feeds the model output: not a family
    modules = dict(model.named_modules())
    fisher = {n: torch.rand_like(m.weight) for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    scores = unit_scores(groups["0"], members["0"], modules, fisher)
    expected = 0.5 * (fisher["0"] * model[0].weight.detach() ** 2).sum((1, 2, 3))
    torch.testing.assert_close(scores.float(), expected)


def test_a_plan_compacts_to_what_the_masked_model_computes() -> None:
    torch.manual_seed(0)
    model = SmallCNN(image_size=8, channels=[16, 32], hidden=24).net.eval()
    for module in model.modules():  # statistics and shifts that make a removed unit's zeroing matter
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.bias.data.uniform_(-1, 1)
    example = torch.randn(4, 1, 8, 8)
    groups = find_unit_groups(model, example)
    members = families(groups)
    assert sorted(members) == ["0", "4", "9"]  # both convolutions and the hidden Linear
    scores = {name: torch.rand(groups[name].num_units) for name in members}
    plan = {name: family_candidates(name, scores[name])[3] for name in members}  # the 4th count of each
    assert [plan[n].kept for n in ("0", "4", "9")] == [10, 8, 15]  # 32 units go in multiples of 8
    masks = unit_masks(plan, scores, members)
    compacted = compact(model, masks, example).model.eval()
    assert compacted[0].out_channels == 10 and compacted[4].out_channels == 8 and compacted[9].out_features == 15
    assert compacted[4].in_channels == 10 and compacted[9].in_features == 8 * 2 * 2 and compacted[11].in_features == 15
    masked = masked_copy(model, groups, masks).eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compacted(x), masked(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(masked(x), model(x), atol=1e-3)  # the masks removed something that mattered
