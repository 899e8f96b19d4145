"""The masks in force, restored from a checkpoint: what does not fit the model is refused at once, naming it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress.pruning.state import MaskState
from lightning_compress.pruning.tracked import TrackedLayers


def _state() -> MaskState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return MaskState(model, TrackedLayers({"0": model[0], "2": model[2]}), structured=True)


BAD: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("mask_of_another_shape", {"masks": {"0.weight": torch.ones(8, 7, dtype=torch.bool)}}, ("'0.weight'", "(8, 6)")),
    ("mask_of_an_unknown_parameter", {"masks": {"9.weight": torch.ones(2, dtype=torch.bool)}}, ("'9.weight'",)),
    ("unit_mask_too_long", {"unit_masks": {"0": torch.ones(12, dtype=torch.bool)}}, ("layer '0'", "12", "(8,)")),
    ("unit_mask_2d", {"unit_masks": {"2": torch.ones(3, 1, dtype=torch.bool)}}, ("layer '2'", "(3,)")),
    ("unit_mask_of_an_unknown_layer", {"unit_masks": {"fc9": torch.ones(3, dtype=torch.bool)}},
     ("layer 'fc9'", "no such pruned layer")),
    ("unit_mask_not_a_tensor", {"unit_masks": {"0": [True] * 8}}, ("layer '0'", "list")),
]


@pytest.mark.parametrize(("state", "texts"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_masks_that_do_not_fit_are_refused_on_load(state: dict[str, Any], texts: tuple[str, ...]) -> None:
    masks = _state()
    before = {k: v.clone() for k, v in masks.model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        masks.load_state_dict(state)
    for text in texts:
        assert text in str(info.value), f"{text!r} missing from: {info.value}"
    assert masks.masks == {} and masks.unit_masks == {}
    assert all(torch.equal(before[k], v) for k, v in masks.model.state_dict().items())


def test_masks_that_fit_round_trip() -> None:
    masks = _state()
    keep = torch.tensor([True, False] * 4)
    masks.load_state_dict({"masks": {"0.weight": keep.view(-1, 1).expand(8, 6).clone()}, "unit_masks": {"0": keep}})
    assert torch.equal(masks.state_dict()["unit_masks"]["0"], keep)
    assert bool((masks.model[0].weight[~keep] == 0).all())
