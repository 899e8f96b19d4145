"""QuantizationAwareTraining under 2-process DDP on CPU (gloo): both ranks train the same scales and deliver the
same codes, equal to the export's. The ``ddp`` fits run ``tests/ddp/qat_scenarios.py`` as a script; each rank
writes what it saw, every assertion is here. The ``ddp_spawn`` fits run in this process (Lightning spawns the ranks),
a recording callback writes each rank's codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors import safe_open

from lightning_compress import QuantizationAwareTraining
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.quantization.packing import unpack
from tests.callbacks.test_ddp import _run_script
from tests.ddp import qat_scenarios
from tests.ddp.scenarios import model as ddp_model
from tests.ddp.scenarios import trainer as ddp_trainer

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


def test_a_mid_qat_checkpoint_of_the_compacting_ddp_fit_resumes_to_the_same_codes_on_both_ranks(codes_run) -> None:
    """The compacting fit stopped after epoch 1 (mid-QAT, its checkpoint holds the compacted shapes) and resumed
    from that checkpoint under ``ddp``: every rank compacts its fresh model to the checkpoint's shapes before
    loading it, and ends with the uninterrupted fit's shapes and codes."""
    out = Path(codes_run[0]["export"]).parents[2]
    full, (first, second) = _ranks(out, "compact")[0], _ranks(out, "compact_resumed")
    assert [e["active"] for e in first["epochs"]] == [True] and first["epochs"] == second["epochs"]  # epoch 2 only
    assert first["shapes"] == second["shapes"] == full["shapes"]
    assert first["layers"] == second["layers"] == full["layers"]
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


# --------------------------------------------------------------------------- ddp_spawn
class _SpawnRecord(Callback):
    """Writes, on each spawned rank at the end of the fit, the codes QAT delivered (module level: ddp_spawn pickles
    the trainer and its callbacks), and counts the steps."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.steps = 0

    def on_train_batch_start(self, *_: Any) -> None:
        self.steps += 1

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        qat = next(c for c in trainer.callbacks if isinstance(c, QuantizationAwareTraining))
        assert qat.result is not None  # a worker's failure reaches the test through the launcher
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": self.steps,
                  "export": qat.report.files.get("quantized"),  # rank zero writes it
                  "layers": {layer.key: {"q": layer.qtensor.q.flatten().tolist(), "method": layer.method,
                                         "scale": layer.qtensor.scale.flatten().tolist()}
                             for layer in qat.result.layers.values()}}
        (Path(self.folder) / f"spawn.rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_qat_under_ddp_spawn_gives_identical_codes_on_both_ranks(tmp_path) -> None:
    """``strategy="ddp_spawn"`` (2 CPU processes, gloo): both ranks deliver the same codes, those of the export;
    the main process's model gets rank zero's final (quantized) weights back from Lightning's launcher."""
    pl.seed_everything(3)
    qat = QuantizationAwareTraining(bits=3, start=1, export_path="model.safetensors")
    fit = ddp_trainer("ddp_spawn", [qat, _SpawnRecord(str(tmp_path))], tmp_path, max_epochs=3)
    module = ddp_model()
    fit.fit(module, DigitsDataModule(batch_size=32))
    first, second = (json.loads((tmp_path / f"spawn.rank{r}.json").read_text()) for r in (0, 1))
    assert (first["rank"], second["rank"], first["world_size"]) == (0, 1, 2) and first["steps"] == second["steps"]
    assert first["layers"] == second["layers"] and set(first["layers"]) == {"net.1.weight", "net.3.weight",
                                                                            "net.5.weight"}
    _assert_exported(first, bits=3)
    for key, layer in first["layers"].items():  # the main process's model holds the dequantized codes
        scale = torch.tensor(layer["scale"]).reshape(-1, 1)
        codes = torch.tensor(layer["q"], dtype=torch.float32).reshape(scale.shape[0], -1)
        assert torch.equal(module.state_dict()[key], codes * scale), key
