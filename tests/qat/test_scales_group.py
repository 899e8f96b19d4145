"""qat/scales_group.py on a plain optimizer: the scales' group added with the first group's settings, taken out of a
checkpoint's optimizer state and put back into a fresh optimizer exactly, removed with its state; old linear-scale
checkpoints restart only the weights' moments."""

from __future__ import annotations

import torch
from torch import nn

from lightning_compress.qat import scales_group


def _step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    optimizer.zero_grad()
    sum((p * p).sum() for p in params).backward()
    optimizer.step()


def test_added_saved_and_restored_into_a_fresh_optimizer_exactly() -> None:
    torch.manual_seed(0)
    weight, scales = nn.Parameter(torch.randn(4)), [nn.Parameter(torch.rand(3)), nn.Parameter(torch.rand(2))]
    optimizer = torch.optim.AdamW([weight], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9))
    group = scales_group.add(optimizer, scales, None, {})
    assert group is optimizer.param_groups[-1] and group["lr"] == 1e-2 and group["weight_decay"] == 0.0
    assert group["betas"] == (0.8, 0.9)  # the first group's settings
    _step(optimizer, [weight, *scales])
    states = [optimizer.state_dict()]
    saved = scales_group.split(optimizer, group, states)
    assert saved is not None and len(states[0]["param_groups"]) == 1 and len(saved["state"]) == 2
    fresh = torch.optim.AdamW([weight], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9))
    copies = [nn.Parameter(s.detach().clone()) for s in scales]
    scales_group.add(fresh, copies, 5e-3, saved)
    assert fresh.param_groups[-1]["lr"] == 1e-2  # the saved group's settings win over the new rate
    for old, new in zip(scales, copies):
        assert torch.equal(optimizer.state[old]["exp_avg"], fresh.state[new]["exp_avg"])
    assert scales_group.split(optimizer, group, []) is None
    scales_group.remove(optimizer, group)
    assert len(optimizer.param_groups) == 1 and all(s not in optimizer.state for s in scales)


def test_a_linear_scales_checkpoint_restarts_the_weights_moments_only() -> None:
    saved = {"group": {"lr": 1.0}, "state": [{"step": 1}, {"step": 2}, {"step": 3}]}
    old = {"scales": {}, "optimizer": saved}
    kept, restarted = scales_group.linear_scales_resumed(old, weights=2)
    assert restarted and kept["state"] == [{}, {}, {"step": 3}] and saved["state"][0] == {"step": 1}
    kept, restarted = scales_group.linear_scales_resumed({**old, "log_gains": {}}, weights=2)
    assert not restarted and kept["state"] == saved["state"]
