"""qat.compaction: the optimizer follows the parameters compaction replaced; masks of resized layers are dropped; a
mid-QAT checkpoint's compaction snapshot is read as untrusted input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_compress.core.io import UntrustedFileError
from lightning_compress.qat.compaction import (
    check_masks_fit,
    check_not_compacted,
    follow_parameters,
    masks_after,
    parse_snapshot,
)


def _stepped() -> tuple[nn.Sequential, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_replaced_parameters_are_swapped_in_and_their_state_restarts() -> None:
    model, optimizer = _stepped()
    before = dict(model.named_parameters())
    kept = model[2].bias
    model[0].weight = nn.Parameter(model[0].weight.detach()[:3].clone())  # what compaction does: a new parameter
    del model[2]._parameters["bias"]  # a parameter that is gone
    names = follow_parameters([optimizer], before, model)
    assert names == ["0.weight", "2.bias"]
    params = optimizer.param_groups[0]["params"]
    assert any(p is model[0].weight for p in params) and not any(p is before["0.weight"] for p in params)
    assert not any(p is kept for p in params) and len(params) == 3
    assert model[0].weight not in optimizer.state and before["0.weight"] not in optimizer.state
    assert torch.equal(optimizer.state[model[2].weight]["step"], torch.tensor(1.0))  # untouched: state kept


def test_masks_of_resized_layers_are_dropped() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    masks = {"0.weight": torch.ones(6, 4, dtype=torch.bool), "1.weight": torch.ones(2, 3, dtype=torch.bool),
             "missing.weight": torch.ones(1, dtype=torch.bool)}
    assert set(masks_after(masks, model)) == {"1.weight"}


@pytest.mark.parametrize(
    ("shape", "refused"),
    [((4, 6), True), ((8, 3), True), ((8, 6), False), ((9, 6), False), ((4, 7), False), ((48,), False)],
)
def test_check_not_compacted_refuses_only_a_checkpoint_smaller_than_the_model(shape, refused) -> None:
    """Smaller along some axis and no larger along any: written after compaction, refused naming the source, the
    key and both shapes; any other mismatch is left to load_state_dict's own error."""
    model = nn.Linear(6, 8)
    state = {"weight": torch.zeros(shape), "bias": torch.zeros(8)}
    if refused:
        with pytest.raises(ValueError, match=rf"cannot resume from ck\.pt: 'weight' is \({shape[0]}, {shape[1]}\) "
                                             r"there, \(8, 6\) in this model"):
            check_not_compacted(state, model, "ck.pt")
    else:
        check_not_compacted(state, model, "ck.pt")


def _snapshot(**changes) -> dict:
    good = {"axes": {"0.weight": {"0": 8}}, "masks": {"1.weight": torch.ones(2, 3, dtype=torch.bool)},
            "final": [0.5, 0.25], "macs": [100, 50], "file": "model.compact.safetensors",
            "layers": {"0": [32, 160, 0.5, ""]}}
    return {**good, **changes}


def test_parse_snapshot_reads_what_the_writer_writes() -> None:
    parsed = parse_snapshot("ck.pt", _snapshot(), "compaction")
    assert parsed["axes"] == {"0.weight": {0: 8}} and parsed["final"] == (0.5, 0.25)
    assert parsed["macs"] == [100, 50] and parsed["layers"] == {"0": [32, 160, 0.5, ""]}


@pytest.mark.parametrize(
    ("snapshot", "match"),
    [
        ([1, 2], r"ck\.pt: compaction must be a dict, got list"),
        ({"axes": {}}, r"compaction lacks \['file', 'final', 'layers', 'macs', 'masks'\]"),
        (_snapshot(axes={"0.weight": {"2": 8}}), r"compaction\.axes: entry '0\.weight' must map axes '0' / '1'"),
        (_snapshot(axes={"0.weight": {"0": -1}}), r"compaction\.axes: entry '0\.weight' must map"),
        (_snapshot(masks={"1.weight": torch.ones(2, 3)}), r"compaction\.masks must map state_dict keys to boolean"),
        (_snapshot(masks=[1]), r"compaction\.masks must map"),
        (_snapshot(final=[0.5, 1.5]), r"compaction\.final must be \[sparsity, weight sparsity\] in \[0, 1\]"),
        (_snapshot(final=[0.5]), r"compaction\.final must be"),
        (_snapshot(macs=[-1, 2]), r"compaction\.macs must be \[MACs before, after\]"),
        (_snapshot(macs=[1.5, 2]), r"compaction\.macs must be"),
        (_snapshot(file="../x.safetensors"), r"compaction\.file must be a plain file name"),
        (_snapshot(file="/abs.safetensors"), r"compaction\.file must be a plain file name"),
        (_snapshot(file="model.pt"), r"compaction\.file must be a plain file name ending in \.safetensors"),
        (_snapshot(layers={"0": [32, 160, 2.0, ""]}), r"compaction\.layers must map layer names"),
        (_snapshot(layers={"0": [32, 160, 0.5]}), r"compaction\.layers must map layer names"),
    ],
    ids=["not-dict", "missing", "axis-2", "size-negative", "mask-float", "masks-list", "final-range", "final-len",
         "macs-negative", "macs-float", "file-parent", "file-absolute", "file-suffix", "layer-sparsity",
         "layer-row"],
)
def test_parse_snapshot_refuses_a_malformed_snapshot(snapshot, match) -> None:
    with pytest.raises(UntrustedFileError, match=match):
        parse_snapshot("ck.pt", snapshot, "compaction")


def test_check_masks_fit_refuses_a_mask_of_another_shape() -> None:
    state = {"1.weight": torch.zeros(2, 3)}
    check_masks_fit("ck.pt", {"1.weight": torch.ones(2, 3, dtype=torch.bool)}, state, "compaction")
    for masks in ({"1.weight": torch.ones(3, 2, dtype=torch.bool)}, {"2.weight": torch.ones(1, dtype=torch.bool)}):
        with pytest.raises(UntrustedFileError, match=r"ck\.pt: compaction\.masks\['\d\.weight'\] is shaped"):
            check_masks_fit("ck.pt", masks, state, "compaction")
