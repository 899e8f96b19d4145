"""find_unit_groups: what each layer's units flow into, and every refusal with its reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.demos.models import MLPClassifier, SmallCNN
from lightning_compress.structure.dependency import UnitGroup, find_unit_groups, prunability_table


# ---------------------------------------------------------------------------- small models
class Residual(nn.Module):
    """stem conv -> BN -> ReLU, then conv-BN-ReLU-conv-BN added to the stem's output, pooled, Linear head."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.conv2, self.bn2 = nn.Conv2d(5, c, 3, padding=1), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.bn0(self.stem(x)))
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(skip)))))
        out = F.relu(out + skip)
        return self.head(out.mean((2, 3)))


class Concat(nn.Module):
    """Two conv branches concatenated on channels, a conv, then flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 4, 1)
        self.mix = nn.Conv2d(7, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.gelu(self.a(x)), self.b(x)], dim=1)
        y = F.max_pool2d(F.relu(self.mix(y)), 2)
        return self.fc(y.view(y.size(0), -1))


class Mixed(nn.Module):
    """Conv1d over (N, C, T) -> transpose so channels are last -> Linear -> BatchNorm1d on (N, T, F) transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 5, 3, padding=1)
        self.fc1, self.bn = nn.Linear(5, 6), nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv(x)).transpose(1, 2) * 0.5  # (N, T, 5)
        h = self.bn(F.leaky_relu(self.fc1(h)).permute(0, 2, 1))  # (N, 6, T)
        return self.fc2(torch.flatten(h.contiguous(), 1))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(2, 4, 1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.project = nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.project(F.relu(self.depthwise(self.expand(x)))).mean((2, 3)))


class TwoHeads(nn.Module):
    """A Linear whose output is returned directly, next to a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out, self.aux = nn.Linear(4, 6), nn.Linear(6, 2), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.out(torch.tanh(self.hidden(x))), self.aux(x)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:
            h = h.relu()
        return self.fc2(h)


class Refusing(nn.Module):
    """Each hidden Linear's output goes through one operation the analysis must refuse."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.op == "sigmoid":
            h = torch.sigmoid(h)
        elif self.op == "layernorm":
            h = self.norm(h)
        elif self.op == "constant":
            h = h + 1.0
        elif self.op == "input_add":
            h = h + x.repeat(1, 2)
        elif self.op == "size":
            h = h / h.shape[1]
        elif self.op == "index":
            h = torch.cat([h[:, :4], h[:, 4:]], dim=1)
        elif self.op == "reused":
            h = self.fc1(x) * 0.5 + h
        return self.fc2(h)


class FixedView(nn.Module):
    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.literal = literal
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(-1, 4 * 16) if self.literal else y.reshape(x.shape[0], -1))


# ---------------------------------------------------------------------------- tests
def test_mlp_chain_and_output_layer() -> None:
    groups = find_unit_groups(MLPClassifier(input_size=64, hidden=[32, 16]), torch.randn(2, 64))
    assert list(groups) == ["net.1", "net.3", "net.5"]
    expected = UnitGroup("net.1", 32, [], [("net.3", 1, 0)], True, "", [], macs=2 * 64 * 32, fan_in=64)
    assert groups["net.1"] == expected
    assert groups["net.3"].consumers == [("net.5", 1, 0)]
    assert (groups["net.5"].prunable, groups["net.5"].reason) == (False, "model output")


def test_small_cnn_followers_and_flatten_repeat() -> None:
    model = SmallCNN(image_size=8, channels=[4, 6], hidden=8)
    groups = find_unit_groups(model, torch.randn(2, 1, 8, 8))
    assert groups["net.0"].followers == ["net.1"] and groups["net.0"].consumers == [("net.4", 1, 0)]
    assert groups["net.4"].followers == ["net.5"]
    assert groups["net.4"].consumers == [("net.9", 2 * 2, 0)]  # 8x8 pooled twice -> 2x2 per channel
    assert groups["net.9"].prunable and not groups["net.11"].prunable
    assert all(m.training for m in model.modules())  # analysed in eval mode, mode restored


def test_submodule_names_are_relative_to_the_module_passed() -> None:
    model = SmallCNN(image_size=8, channels=[4, 6], hidden=8)
    groups = find_unit_groups(model.net, torch.randn(2, 1, 8, 8))
    assert groups["4"].consumers == [("9", 4, 0)]


def test_residual_add_couples_the_producers() -> None:
    groups = find_unit_groups(Residual(), torch.randn(2, 3, 8, 8))
    stem, conv2 = groups["stem"], groups["conv2"]
    assert stem.prunable and conv2.prunable
    assert stem.coupled == ["conv2"] and conv2.coupled == ["stem"]
    assert set(stem.followers) == {"bn0", "bn2"} and stem.followers == conv2.followers
    assert set(stem.consumers) == {("conv1", 1, 0), ("head", 1, 0)}
    assert groups["conv1"].coupled == [] and groups["conv1"].followers == ["bn1"]


def test_concat_offsets_and_functional_view() -> None:
    groups = find_unit_groups(Concat(), torch.randn(2, 2, 8, 8))
    assert groups["a"].consumers == [("mix", 1, 0)]
    assert groups["b"].consumers == [("mix", 1, 3)]
    assert groups["mix"].consumers == [("fc", 16, 0)]  # view(N, -1) after a 2x2 pool of 8x8


def test_transpose_permute_batchnorm1d_and_scaling() -> None:
    groups = find_unit_groups(Mixed(), torch.randn(2, 3, 4))
    assert groups["conv"].consumers == [("fc1", 1, 0)]
    assert groups["fc1"].followers == ["bn"] and groups["fc1"].consumers == [("fc2", 4, 0)]


def test_grouped_convolution_is_refused_on_both_sides() -> None:
    groups = find_unit_groups(Depthwise(), torch.randn(2, 2, 6, 6))
    assert not groups["expand"].prunable and "`depthwise`, which is a grouped convolution" in groups["expand"].reason
    assert not groups["depthwise"].prunable and "groups=4" in groups["depthwise"].reason
    assert groups["project"].prunable and groups["project"].consumers == [("fc", 1, 0)]


def test_every_returned_layer_is_model_output() -> None:
    groups = find_unit_groups(TwoHeads(), torch.randn(2, 4))
    assert groups["hidden"].prunable and groups["hidden"].consumers == [("out", 1, 0)]
    assert groups["out"].reason == groups["aux"].reason == "model output"


def test_data_dependent_control_flow_is_followed() -> None:
    """torch.fx cannot trace Branchy; the recorded forward pass takes its real branch. `h.sum()` feeds only the
    condition, and removed units add zero to a sum, so fc1 stays prunable."""
    groups = find_unit_groups(Branchy(), torch.randn(2, 4))
    assert set(groups) == {"fc1", "fc2"}
    assert groups["fc1"].prunable and groups["fc1"].consumers == [("fc2", 1, 0)]
    assert groups["fc2"].reason == "model output"


class Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_a_forward_that_raises_makes_every_layer_unprunable_with_the_error() -> None:
    group = find_unit_groups(Failing(), torch.randn(2, 4))["fc"]
    assert not group.prunable
    assert group.reason == "the forward pass of Failing on the example input raised RuntimeError: boom"


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        ("sigmoid", "units reach `sigmoid`"),
        ("layernorm", "units reach `norm` (LayerNorm)"),
        ("constant", "adds a constant"),
        ("input_add", "adds the units to a tensor no prunable layer produces"),
        ("size", "a trial removal of one of its units changed the model's outputs (max abs difference"),
        ("index", "units reach `getitem`"),
        ("reused", "`fc1` is called more than once"),
    ],
)
def test_unsupported_uses_are_refused_with_a_reason(op: str, reason: str) -> None:
    groups = find_unit_groups(Refusing(op), torch.randn(2, 4))
    assert not groups["fc1"].prunable
    assert reason in groups["fc1"].reason


def test_plain_refusing_model_is_prunable() -> None:
    assert find_unit_groups(Refusing("none"), torch.randn(2, 4))["fc1"].prunable  # the harness itself is fine


@pytest.mark.parametrize(("literal", "prunable"), [(True, False), (False, True)])
def test_view_with_a_literal_unit_size_is_refused(literal: bool, prunable: bool) -> None:
    group = find_unit_groups(FixedView(literal), torch.randn(2, 1, 4, 4))["conv"]
    assert group.prunable is prunable
    assert prunable or "a trial removal of one of its units changed the model's outputs (the compacted model raised" \
        in group.reason
    assert not prunable or group.consumers == [("fc", 16, 0)]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        self.net[2].weight = self.net[0].weight
        self.spare = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_unused_layer_and_shared_weights() -> None:
    groups = find_unit_groups(Tied(), torch.randn(2, 4))
    assert "`net.0` shares a parameter" in groups["net.0"].reason
    assert "consumed by `net.2`, which shares a parameter" in groups["net.0"].reason
    assert "`net.2` shares a parameter" in groups["net.2"].reason
    assert groups["spare"].reason.startswith("not called in the forward pass")


def test_example_input_type_is_checked() -> None:
    with pytest.raises(TypeError, match="`example_input` must be a tensor, a tuple of positional arguments or a dict "
                       "of keyword arguments, got str"):
        find_unit_groups(nn.Linear(2, 2), "x")


def test_prunability_table_names_every_layer_and_why() -> None:
    table = prunability_table(find_unit_groups(Depthwise(), torch.randn(2, 2, 6, 6)))
    lines = table.splitlines()
    assert len(lines) == 5 and lines[0].split() == ["layer", "units", "blocks", "decision"]
    assert "refused: `depthwise` is a grouped convolution (groups=4)" in table
    assert any(line.startswith("project") and line.endswith("prunable") for line in lines)


class _UnusedPooler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.pooler, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        self.pooler(h)  # runs, but nothing returned depends on it
        return self.head(h)


def test_a_layer_whose_output_is_unused_is_dead_code_not_prunable_units() -> None:
    groups = find_unit_groups(_UnusedPooler(), torch.randn(2, 8))
    assert groups["pooler"].dead and not groups["pooler"].prunable and "dead code" in groups["pooler"].reason
    assert groups["fc"].prunable and not groups["fc"].dead  # its units still feed the output through `head`
    assert ("pooler", 1, 0) in groups["fc"].consumers
    assert not groups["head"].dead and groups["head"].reason == "model output"
