"""QuantizationAwareTraining under 2-process DDP on CPU (gloo): both ranks train the same scales and deliver the
same codes, equal to the export's. The fit runs ``tests/ddp/qat_scenarios.py`` as a script (``strategy="ddp"``);
each rank writes what it saw, every assertion is here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from lightning_compress.quantization.packing import unpack
from tests.callbacks.test_ddp import _run_script
from tests.ddp import qat_scenarios

pytestmark = pytest.mark.ddp


@pytest.fixture(scope="module")
def codes_run(tmp_path_factory, monkeypatch_module) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("qat-ddp")
    monkeypatch_module.setattr("tests.callbacks.test_ddp.HELPERS", Path(qat_scenarios.__file__).resolve())
    _run_script("codes", out)
    return _ranks(out, "codes")


@pytest.fixture(scope="module")
def compact_run(codes_run) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same script's second fit: structured pruning with compact=True, then int4 QAT."""
    return _ranks(Path(codes_run[0]["export"]).parents[2], "compact")


@pytest.fixture(scope="module")
def activations_run(tmp_path_factory, monkeypatch_module) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("qat-ddp-activations")
    monkeypatch_module.setattr("tests.callbacks.test_ddp.HELPERS", Path(qat_scenarios.__file__).resolve())
    _run_script("activations", out)
    return _ranks(out, "activations")


def _ranks(out: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    first, second = (json.loads((out / f"{tag}.rank{r}.json").read_text()) for r in (0, 1))
    return first, second


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_two_ranks_really_ran_ddp_with_the_scales_inside_the_wrapper(codes_run) -> None:
    first, second = codes_run
    assert (first["rank"], second["rank"]) == (0, 1)
    assert first["world_size"] == second["world_size"] == 2 and first["strategy"] == "DDPStrategy"
    assert first["wrapped_scales"] and second["wrapped_scales"]  # DDP reduces the scales' gradients


def test_scales_gradients_and_weights_are_identical_on_both_ranks_every_epoch(codes_run) -> None:
    first, second = codes_run
    assert [e["active"] for e in first["epochs"]] == [False, True, True]
    assert first["epochs"] == second["epochs"]
    assert first["epochs"][1]["scales"] != first["epochs"][2]["scales"]  # the scales trained


def test_both_ranks_deliver_the_same_codes_and_scales_as_the_export(codes_run) -> None:
    first, second = codes_run
    assert first["layers"] == second["layers"]
    assert set(first["layers"]) == {"net.1.weight", "net.3.weight", "net.5.weight"}
    _assert_exported(first, bits=3)


def test_compacted_then_qat_gives_the_same_smaller_model_and_codes_on_both_ranks(compact_run) -> None:
    first, second = compact_run
    assert first["shapes"] == second["shapes"] and first["epochs"] == second["epochs"]
    assert first["shapes"]["net.1.weight"][0] + first["shapes"]["net.3.weight"][0] < 96  # hidden units removed
    assert first["shapes"]["net.3.weight"][1] == first["shapes"]["net.1.weight"][0]
    assert first["wrapped_scales"] and second["wrapped_scales"]
    assert first["layers"] == second["layers"]
    _assert_exported(first, bits=4)


def _assert_exported(record: dict[str, Any], bits: int) -> None:
    with safe_open(record["export"], framework="pt") as handle:
        for key, layer in record["layers"].items():
            assert layer["method"] == "qat"
            q = torch.tensor(layer["q"], dtype=torch.int8)
            codes = unpack(handle.get_tensor(f"{key}:qdata"), bits, q.numel(), signed=True)
            assert torch.equal(codes.reshape(-1), q), key
            assert torch.equal(handle.get_tensor(f"{key}:scale").flatten(), torch.tensor(layer["scale"])), key


def test_activation_ranges_are_trained_identically_on_both_ranks(activations_run) -> None:
    """activations="int8" under DDP: the input steps are parameters of the re-wrapped module (their gradients
    all-reduced), initialised from the min / max over both ranks' first batches: the same ranges every epoch and
    at the end, and the same codes."""
    first, second = activations_run
    assert first["world_size"] == second["world_size"] == 2 and first["strategy"] == "DDPStrategy"
    assert first["wrapped_scales"] and second["wrapped_scales"]  # weight scales and input steps inside DDP
    assert [e["active"] for e in first["epochs"]] == [False, True, True]
    assert first["epochs"] == second["epochs"]
    assert set(first["epochs"][1]["ranges"]) == {"net.1", "net.3", "net.5"}
    assert first["epochs"][1]["ranges"] != first["epochs"][2]["ranges"]  # the steps trained
    assert first["ranges"] == second["ranges"] and set(first["ranges"]) == {"net.1.weight", "net.3.weight",
                                                                             "net.5.weight"}
    assert first["layers"] == second["layers"]
    _assert_exported(first, bits=4)
