"""Loaders trust the model, not the file (issue 19): every loader × every kind of wrong file.

Loaders: ``load_compressed`` on each artifact kind, the kind's own loader (``load_quantized``, ``load_compacted``,
``load_float``) and, for checkpoints, Lightning's ``trainer.test(model, ckpt_path=...)`` with the callbacks in the
Trainer. Files: another width (wider, narrower, compacted from another width), another depth, another input size, a
layer grown to 4096 units, edited hyper-parameters, a checkpoint from before compression, malformed metadata, and
(in a child process, peak memory measured) a huge declared shape. Each is refused with the error type and a message
naming the file and what differs, and the model's weights and shapes are unchanged after the refusal.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization, compact, load_compressed, quantize
from lightning_compress.core.io import UntrustedFileError
from lightning_compress.demos.data import DigitsDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.integration.artifacts import CHECKPOINT_KEY, checkpoint_entry
from lightning_compress.integration.compressed_checkpoint import pack
from lightning_compress.quantization.export import (
    METADATA_KEY,
    load_float,
    load_quantized,
    save_float,
    save_quantized,
)
from lightning_compress.structure.serialization import load_compacted, save_compacted
from lightning_compress.structure.shape_rules import RECORD_KEY, compacted_axes, encode
from tests.helpers import quiet_trainer, report_of

KINDS = ("checkpoint", "quantized", "compacted", "float")
EXPORT = "model.int4.safetensors"


def _mlp(**kwargs: Any) -> MLPClassifier:
    return MLPClassifier(**{"input_size": 64, "hidden": [64, 32], "lr": 5e-3, **kwargs})


def _callbacks() -> list[pl.Callback]:
    return [GradientStabilityPruning(sparsity=0.5, structured=True, compact=True, schedule="one_shot", start_step=20),
            PostTrainingQuantization(bits=4, export_path=EXPORT)]


@dataclass
class Run:
    trainer: pl.Trainer
    model: MLPClassifier
    data: DigitsDataModule
    files: dict[str, Path]  # kind -> the fit's artifact, and "last": ModelCheckpoint's last.ckpt
    directory: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One short fit: structured pruning with compaction, then int4; every artifact it writes."""
    root = tmp_path_factory.mktemp("run")
    pl.seed_everything(0)
    model, data = _mlp(), DigitsDataModule(batch_size=64)
    checkpoint = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    trainer = quiet_trainer([*_callbacks(), checkpoint], max_epochs=2, enable_checkpointing=True,
                            default_root_dir=root)
    trainer.fit(model, data)
    files = report_of(trainer).files
    paths = {"checkpoint": Path(files["compressed_checkpoint"]), "quantized": Path(files["quantized"]),
             "compacted": Path(files["compacted"]), "float": Path(files["float_copy"]),
             "last": root / "checkpoints" / "last.ckpt"}
    assert all(path.is_file() for path in paths.values())
    assert model.net[1].out_features < 64  # compaction shrank the model: the files hold smaller shapes
    return Run(trainer, model, data, paths, tmp_path_factory.mktemp("bad"))


# ---------------------------------------------------------------------------- files of another configuration
def _compacted_mlp(hidden: list[int], keep: int, **kwargs: Any) -> MLPClassifier:
    """A model of another configuration whose first hidden layer was compacted to ``keep`` units."""
    model = _mlp(hidden=hidden, **kwargs)
    compact(model, {"net.1": torch.arange(hidden[0]) < keep}, model.example_input_array, inplace=True)
    return model


def _write(run: Run, kind: str, model: MLPClassifier, path: Path, hparams: bool = True) -> Path:
    """``model`` written as an artifact of ``kind``, the way the package writes it (a checkpoint: the fit's
    ``compressed.ckpt`` with the model packed, its hyper-parameters and compaction record; ``checkpoint_v1``: as
    before format 2, the model's float ``state_dict`` in the checkpoint)."""
    if kind == "quantized":
        model = copy.deepcopy(model)
        save_quantized(model, quantize(model, bits=4), path)
    elif kind == "compacted":
        save_compacted(model, path)
    elif kind == "float":
        save_float(model, path)
    else:
        axes = encode(compacted_axes(model))
        checkpoint = torch.load(run.files["checkpoint"], weights_only=True)
        checkpoint.update({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                           CHECKPOINT_KEY: checkpoint_entry("compressed", compacted=bool(axes), **{RECORD_KEY: axes})})
        if kind == "checkpoint":
            pack(checkpoint, model)
        if not hparams:
            del checkpoint["hyper_parameters"]
        torch.save(checkpoint, path)
    return path


def _suffix(kind: str) -> str:
    return ".ckpt" if kind.startswith("checkpoint") else ".fp32.safetensors" if kind == "float" else ".safetensors"


def _edited_checkpoint(run: Run, path: Path, change: Callable[[dict], None]) -> Path:
    checkpoint = torch.load(run.files["checkpoint"], weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    return path


def _edited_safetensors(source: Path, path: Path, tensors: Callable[[dict], None] | None = None,
                        metadata: Callable[[dict], None] | None = None) -> Path:
    with safe_open(str(source), framework="pt") as handle:
        values = {key: handle.get_tensor(key) for key in handle.keys()}
        meta = dict(handle.metadata() or {})
    if tensors:
        tensors(values)
    if metadata:
        metadata(meta)
    save_file(values, str(path), metadata=meta)
    return path


def _grown(values: dict) -> None:
    """net.1 grown to 4096 units (its rows, its bias, net.3's columns), as a hand-edited file would be."""
    values["net.1.weight"], values["net.1.bias"] = torch.zeros(4096, 64), torch.zeros(4096)
    values["net.3.weight"] = torch.zeros(values["net.3.weight"].shape[0], 4096)


def _set_record(kind: str, value: Any) -> Callable[[dict], None]:
    """The compaction record replaced by ``value`` in a file's metadata."""
    def change(meta: dict) -> None:
        if kind == "compacted":
            meta[RECORD_KEY] = value if isinstance(value, str) else json.dumps(value)
        else:
            parsed = json.loads(meta[METADATA_KEY])
            parsed[RECORD_KEY] = value
            meta[METADATA_KEY] = json.dumps(parsed)
    return change


def _bad_json(kind: str) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        meta["aliases" if kind == "compacted" else METADATA_KEY] = "{not json"
    return change


def _sparse_past_the_end(run: Run, kind: str, path: Path) -> Path | None:
    """The run's configuration with 90 % of its weights pruned, int4, so net.1.weight is stored as gaps (issue 23),
    edited so that its gaps run past the weight's 4096 positions; in the quantized export or packed in the
    compressed checkpoint."""
    if kind not in ("quantized", "checkpoint"):
        return None
    model = _mlp()
    with torch.no_grad():
        for layer in (model.net[1], model.net[3]):
            layer.weight[torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.9] = 0
    quantize(model, bits=4)
    written = _write(run, kind, model, path)

    def past_the_end(values: dict) -> None:
        values["net.1.weight:gaps"] = torch.full_like(values["net.1.weight:gaps"], 255)

    if kind == "quantized":
        return _edited_safetensors(written, path, past_the_end)
    checkpoint = torch.load(path, weights_only=True)
    packed = run.directory / f"{path.stem}.packed.safetensors"
    packed.write_bytes(checkpoint[CHECKPOINT_KEY]["packed"].numpy().tobytes())
    _edited_safetensors(packed, packed, past_the_end)
    checkpoint[CHECKPOINT_KEY]["packed"] = torch.frombuffer(bytearray(packed.read_bytes()), dtype=torch.uint8)
    torch.save(checkpoint, path)
    return path


# variant -> (builder(run, kind, path) -> path, None for a kind it does not apply to (CHECKPOINT_ONLY), texts the
# message must hold by kind, "*" for every other kind)
Builder = Callable[[Run, str, Path], "Path | None"]
HPARAMS = "hyper-parameter"
VARIANTS: dict[str, tuple[Builder, dict[str, tuple[str, ...]]]] = {
    "wider_compacted": (lambda r, k, p: _write(r, k, _compacted_mlp([128, 32], 50), p),
                        {"checkpoint": (HPARAMS, "'hidden'"), "*": ("'net.1.", "compacted from sizes", "128")}),
    "narrower_compacted": (lambda r, k, p: _write(r, k, _compacted_mlp([32, 16], 20), p),
                           {"checkpoint": (HPARAMS, "'hidden'"), "*": ("'net.1.", "compacted from sizes", "32")}),
    "narrower": (lambda r, k, p: _write(r, k, _mlp(hidden=[8, 4]), p),
                 {"checkpoint": (HPARAMS, "[8, 4]"), "*": ("'net.1.", "declared shape [8", "the model has [64")}),
    "wider": (lambda r, k, p: _write(r, k, _mlp(hidden=[128, 32]), p),
              {"checkpoint": (HPARAMS, "[128, 32]"), "*": ("'net.1.", "declared shape [128", "the model has [64")}),
    "wider_without_hparams": (lambda r, k, p: _write(r, k, _mlp(hidden=[128, 32]), p, hparams=False)
                              if k.startswith("checkpoint") else None,
                              {"*": ("'net.1.", "declared shape [128", "the model has [64")}),
    "deeper": (lambda r, k, p: _write(r, k, _mlp(hidden=[64, 32, 16]), p),
               {"checkpoint": (HPARAMS, "'hidden'"), "*": ("'net.7.", "is not in the model's state_dict")}),
    "input_784": (lambda r, k, p: _write(r, k, _mlp(input_size=784), p),
                  {"checkpoint": (HPARAMS, "'input_size'", "784"),
                   "*": ("'net.1.weight'", "declared shape [64, 784]", "the model has [64, 64]")}),
    "input_784_without_hparams": (lambda r, k, p: _write(r, k, _mlp(input_size=784), p, hparams=False)
                                  if k.startswith("checkpoint") else None,
                                  {"*": ("'net.1.weight'", "declared shape [64, 784]", "[64, 64]")}),
    "grown_to_4096": (lambda r, k, p: _edited_checkpoint(r, p, lambda c: _grown(c["state_dict"])) if k == "checkpoint"
                      else _edited_safetensors(r.files[k], p, _grown) if k in ("compacted", "float")
                      else _write(r, k, _mlp(hidden=[4096, 32]), p),
                      {"*": ("'net.1.", "4096")}),
    "edited_hparams": (lambda r, k, p: _edited_checkpoint(r, p, lambda c: c["hyper_parameters"].update(hidden=[8, 4]))
                       if k == "checkpoint" else None, {"*": (HPARAMS, "'hidden'", "[8, 4]", "[64, 32]")}),
    "malformed_json": (lambda r, k, p: _edited_checkpoint(r, p, lambda c: c.update({CHECKPOINT_KEY: "garbage"}))
                       if k == "checkpoint" else _edited_safetensors(r.files[k], p, metadata=_bad_json(k)),
                       {"checkpoint": (f"'{CHECKPOINT_KEY}' entry", "'garbage'"), "*": ("not valid JSON",)}),
    "malformed_record": (lambda r, k, p: _edited_checkpoint(
                             r, p, lambda c: c[CHECKPOINT_KEY].update({RECORD_KEY: {"net.1.weight": [0]}}))
                         if k == "checkpoint" else _edited_safetensors(
                             r.files[k], p, metadata=_set_record(k, {"net.1.weight": {"2": -5}})),
                         {"*": (RECORD_KEY, "'net.1.weight'")}),
    "malformed_state_dict": (lambda r, k, p: _edited_checkpoint(r, p, lambda c: c.update(state_dict=[1, 2]))
                             if k == "checkpoint" else None, {"*": ("'state_dict'", "list")}),
    "sparse_gaps_past_the_end": (_sparse_past_the_end,
                                 {"*": ("'net.1.weight:gaps'", "beyond the weight's 4096 positions")}),
}


def _direct(kind: str) -> Callable[[Run, MLPClassifier, Path], Any]:
    """The kind's own loader: load_quantized / load_compacted / load_float, or Lightning's ckpt_path."""
    if kind.startswith("checkpoint"):
        return lambda r, m, p: quiet_trainer(_callbacks()).test(m, r.data, ckpt_path=str(p), verbose=False)
    loader = {"quantized": load_quantized, "compacted": load_compacted, "float": load_float}[kind]
    return lambda r, m, p: loader(m, p)


LOADERS = {"load_compressed": lambda kind: lambda r, m, p: load_compressed(m, p), "own_loader": _direct}
CHECKPOINT_ONLY = {"wider_without_hparams", "input_784_without_hparams", "edited_hparams", "malformed_state_dict"}
WRITTEN = {"wider_compacted", "narrower_compacted", "narrower", "wider", "wider_without_hparams", "deeper", "input_784",
           "input_784_without_hparams"}  # also written as a compressed.ckpt of format 1 (float state_dict)
CODES_ONLY = {"sparse_gaps_past_the_end"}  # files holding codes: the quantized export and compressed.ckpt
CASES = [pytest.param(variant, kind, loader, id=f"{variant}-{kind}-{loader}")
         for variant in VARIANTS for kind in (*KINDS, "checkpoint_v1") for loader in LOADERS
         if (kind == "checkpoint" or variant not in CHECKPOINT_ONLY)
         and (kind != "checkpoint_v1" or variant in WRITTEN)
         and (kind in ("quantized", "checkpoint") or variant not in CODES_ONLY)]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize(("variant", "kind", "loader"), CASES)
def test_every_loader_refuses_a_file_the_model_did_not_write(run: Run, variant: str, kind: str, loader: str) -> None:
    build, texts = VARIANTS[variant]
    path = build(run, kind, run.directory / f"{variant}-{kind}{_suffix(kind)}")
    assert path is not None
    model = _mlp()
    before = _state(model)
    with pytest.raises(UntrustedFileError) as info:
        LOADERS[loader](kind)(run, model, path)
    message = str(info.value)
    for text in (str(path), *texts.get(kind.removesuffix("_v1"), texts.get("*", ()))):
        assert text in message, f"{text!r} missing from: {message}"
    assert "weights_only" not in message
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------- what the artifact is
def test_a_checkpoint_from_before_compression_is_refused_naming_the_file_to_load(run: Run) -> None:
    plain = _edited_checkpoint(run, run.directory / "plain.ckpt", lambda c: c.pop(CHECKPOINT_KEY))
    for path, what in ((run.files["last"], "stage 'training'"), (plain, f"no '{CHECKPOINT_KEY}' compressed entry")):
        model = _mlp()
        before = _state(model)
        with pytest.raises(ValueError, match="not a compressed model") as info:
            load_compressed(model, path)
        assert str(path) in str(info.value) and what in str(info.value) and "compressed.ckpt" in str(info.value)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Lightning's ckpt_path: refused when the model in memory is the compressed one (it would evaluate float)
    before = _state(run.model)
    with pytest.raises(ValueError, match="holds the model as it was during training"):
        run.trainer.test(run.model, run.data, ckpt_path=str(run.files["last"]), verbose=False)
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())


def test_the_files_of_the_fit_load_and_a_float_copy_of_another_run_is_refused(run: Run) -> None:
    x = next(iter(run.data.test_dataloader()))[0]
    run.model.eval()
    for kind in KINDS:
        loaded = load_compressed(_mlp(), run.files[kind]).eval()
        assert loaded.net[1].weight.shape == run.model.net[1].weight.shape
        if kind in ("checkpoint", "quantized"):
            assert torch.equal(loaded(x), run.model(x))
    other = run.directory / "pair"
    other.mkdir()
    export, float_copy = other / "m.safetensors", other / "m.fp32.safetensors"
    export.write_bytes(run.files["quantized"].read_bytes())
    save_float(load_compressed(_mlp(), run.files["float"]), float_copy, run_id="another-run")
    with pytest.raises(UntrustedFileError, match="were not written by the same run"):
        load_compressed(_mlp(), float_copy)
    with pytest.warns(UserWarning, match="float copy of another run"):
        load_compressed(_mlp(), export)


@pytest.mark.parametrize("suffix", [".onnx", ".ckpt", ".pt"])
def test_a_file_torch_cannot_load_safely_never_gets_the_weights_only_advice(tmp_path: Path, suffix: str) -> None:
    onnx_like = tmp_path / f"model{suffix}"
    onnx_like.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(64))  # protobuf bytes, as an ONNX file starts
    pickled = tmp_path / f"pickled{suffix}"
    torch.save({"state_dict": {}, "object": pl.Trainer}, pickled)  # a class: refused by weights_only loading
    for path, what in ((onnx_like, "is not a checkpoint written by torch.save"),
                       (pickled, "holds Python objects other than tensors")):
        with pytest.raises(UntrustedFileError) as info:
            load_compressed(_mlp(), path)
        assert str(path) in str(info.value) and what in str(info.value) and "allowed:" in str(info.value)
        assert "weights_only" not in str(info.value)


# ---------------------------------------------------------------------------- huge declared shapes, peak memory
_MEASURED = textwrap.dedent("""
    import json, resource, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from lightning_compress import load_compressed
    from lightning_compress.demos.data import DigitsDataModule
    from lightning_compress.demos.models import MLPClassifier
    from lightning_compress.quantization.export import load_float, load_quantized, load_quantized_tensors
    from lightning_compress.structure.serialization import load_compacted
    from tests.helpers import quiet_trainer
    from tests.integration.test_loader_safety import _callbacks

    def lightning(model, path):
        quiet_trainer(_callbacks()).test(model, DigitsDataModule(batch_size=64), ckpt_path=path, verbose=False)

    loaders = {"load_compressed": load_compressed, "load_quantized": load_quantized, "load_float": load_float,
               "load_compacted": load_compacted, "lightning": lightning,
               "load_quantized_tensors": lambda model, path: load_quantized_tensors(path)}  # no model to bound it
    for name, path in json.loads(sys.argv[1]):
        model = MLPClassifier(input_size=64, hidden=[64, 32], lr=5e-3)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            loaders[name](model, path)
            error, message = "loaded", ""
        except Exception as err:  # the type and message are judged by the parent
            error, message = type(err).__name__, str(err)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
        print(json.dumps([name, path, error, message, grown]))
""")


def _huge_files(run: Run) -> dict[str, Path]:
    """Small files declaring a (20000, 20000) or (1e6, 1e6) weight, for every kind; sparse layouts (bitmap and gaps,
    no code kept or some) declaring a (60000, 60000) one, in the quantized export and the compressed checkpoint."""
    directory = run.directory / "huge"
    directory.mkdir()

    def expanded(size: int) -> Callable[[dict], None]:  # a zero-stride view: a few bytes on disk, size² declared
        def change(checkpoint: dict) -> None:
            for key in set(checkpoint) - {"pytorch-lightning_version", "state_dict", "hyper_parameters",
                                          CHECKPOINT_KEY}:
                del checkpoint[key]  # only what a checkpoint needs: a small file
            checkpoint["state_dict"]["net.1.weight"] = torch.zeros(1).expand(size, size)
        return change

    def huge_layer(meta: dict) -> None:
        parsed = json.loads(meta[METADATA_KEY])
        parsed["layers"]["net.1.weight"].update(shape=[20000, 20000], zero_point_shape=[20000, 1])
        meta[METADATA_KEY] = json.dumps(parsed)

    def huge_tensor(source: Path, path: Path) -> Path:  # a header that declares 1.6 GB in a file of a few KiB
        header = json.dumps({"__metadata__": _metadata_of(source), "net.1.weight": {
            "dtype": "F32", "shape": [20000, 20000], "data_offsets": [0, 4 * 20000 * 20000]}}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4096))
        return path

    files = {
        "checkpoint_20000": _edited_checkpoint(run, directory / "c20000.ckpt", expanded(20000)),
        "checkpoint_1e6": _edited_checkpoint(run, directory / "c1e6.ckpt", expanded(10**6)),
        "quantized": _edited_safetensors(run.files["quantized"], directory / "q.safetensors", metadata=huge_layer),
        "float": huge_tensor(run.files["float"], directory / "f.fp32.safetensors"),
        "compacted": huge_tensor(run.files["compacted"], directory / "k.safetensors"),
        **{f"{kind}_{case}": _sparse_huge(run, kind, case, directory / f"s_{case}{_suffix(kind)}")
           for kind in ("quantized", "checkpoint") for case in SPARSE_HUGE},
    }
    sizes = {key: path.stat().st_size for key, path in files.items()}
    assert all(size < 32 << 10 for size in sizes.values()), sizes
    return files


def _sparse_huge(run: Run, kind: str, case: str, path: Path) -> Path:
    """The run's configuration with net.1 pruned (``kept_0``: all of it) and stored sparse at 4 bits per tensor (one
    scale: nothing but the layout bounds the shape), its metadata then declaring a (60000, 60000) weight; a
    ``bitmap_kept_0`` is a gaps layer restated as a bitmap (the writer never picks one for kept=0). In the quantized
    export, or packed in the compressed checkpoint."""
    model = _mlp()
    sparsity = 1.0 if case.endswith("kept_0") else 0.6 if case.startswith("bitmap") else 0.97
    with torch.no_grad():
        weight = model.net[1].weight
        weight[torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) < sparsity] = 0
    result = quantize(model, bits=4, granularity="per_tensor")
    if kind == "quantized":
        save_quantized(model, result, path)
        packed = path
    else:
        _write(run, kind, model, path)
        checkpoint = torch.load(path, weights_only=True)
        packed = run.directory / "huge" / f"{path.stem}.packed.safetensors"
        packed.write_bytes(checkpoint[CHECKPOINT_KEY]["packed"].numpy().tobytes())

    def tensors(values: dict) -> None:
        if case == "bitmap_kept_0":
            del values["net.1.weight:gaps"]
            values["net.1.weight:mask"] = torch.zeros(512, dtype=torch.uint8)

    def metadata(meta: dict) -> None:
        parsed = json.loads(meta[METADATA_KEY])
        layer = parsed["layers"]["net.1.weight"]
        assert layer["layout"] == ("gaps" if case.endswith("kept_0") else case.split("_")[0]), layer
        assert (layer["kept"] == 0) == case.endswith("kept_0"), layer
        if case == "bitmap_kept_0":
            layer["layout"] = "bitmap"
            del layer["gap_bits"]
        layer["shape"] = [60000, 60000]
        meta[METADATA_KEY] = json.dumps(parsed)

    _edited_safetensors(packed, packed, tensors, metadata)
    if kind == "checkpoint":
        checkpoint[CHECKPOINT_KEY]["packed"] = torch.frombuffer(bytearray(packed.read_bytes()), dtype=torch.uint8)
        torch.save(checkpoint, path)
    return path


SPARSE_HUGE = ("gaps_kept_0", "gaps_kept_some", "bitmap_kept_0", "bitmap_kept_some")


def _metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def test_huge_declared_shapes_are_refused_before_allocating(run: Run) -> None:
    files = _huge_files(run)
    own = {"checkpoint": "lightning", "quantized": "load_quantized", "float": "load_float",
           "compacted": "load_compacted"}
    jobs = [(loader, str(path)) for key, path in files.items()
            for loader in ("load_compressed", own[key.split("_")[0]])]
    jobs += [("load_quantized_tensors", str(path)) for key, path in files.items() if "kept" in key
             and key.startswith("quantized")]
    out = subprocess.run([sys.executable, "-c", _MEASURED, json.dumps(jobs)], capture_output=True, text=True,
                         timeout=300, check=False, cwd=Path(__file__).parents[2])
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(results) == len(jobs), out.stderr[-3000:]
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    for loader, path, error, message, grown in results:
        assert error == "UntrustedFileError", (loader, path, error, message)
        assert path in message and "net.1.weight" in message, (loader, message)
        assert grown * unit < 100 << 20, f"{loader} on {path}: peak RSS grew by {grown * unit / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------- the CLI's --ckpt_path
@pytest.mark.parametrize("kind", ["quantized", "compacted", "float"])  # a .ckpt: LightningCLI reads it first
def test_the_cli_refuses_a_file_of_another_width_in_one_line(run: Run, kind: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    from lightning_compress.cli import main

    path = run.files[kind]
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--model=MLPClassifier", "--model.init_args.input_size=64", "--model.init_args.hidden=[64]",
              "--model.init_args.lr=0.005", "--data=DigitsDataModule", "--ckpt_path", str(path),
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "`--ckpt_path`" in err and str(path) in err and "Traceback" not in err, err
    assert "key 'net.5.bias': is not in the model's state_dict" in err, err  # one layer more than hidden=[64]
