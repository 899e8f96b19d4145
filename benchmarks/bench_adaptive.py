"""Compress to a budget (``lightning_compress.compress``) on an MLP trained on sklearn's digits.

    python benchmarks/bench_adaptive.py [--quick] [--json PATH]

1. How well the score ranks candidates: for every candidate of every layer (widths 2-8 and float x per channel /
   groups of 32 x sparsity 0 / 50 / 75 / 90 %), the predicted loss increase ``1/2 sum(F dW^2)`` against the
   measured one (validation cross-entropy with that layer alone changed); Spearman rank correlation, side by side
   with the same scores times each layer's measured scale (``compress(scale="measured")``; the default is
   ``"fisher"``) and with plain ``sum(dW^2)``, and per layer the median measured / predicted ratio (how far the
   scale is off).
2. Adaptive vs uniform, side by side in one run: for each uniform configuration (bits x granularity, every layer
   alike, round to nearest with MSE clipping), its file and test accuracy / loss, and ``compress()`` with the
   budget set to that file's size, with measured per-layer scales and with the Fisher alone. Under a size budget
   alone ``compress()`` offers no sparsity (stored dense it buys no bytes), so it is the bits-only search here.
   Seeds give the spread.
3. ``--minilm``: all-MiniLM-L6-v2 (``bench_minilm.py``'s model, calibration texts and evaluation sentences), no
   bound: ``compress()`` at 0.12 / 0.135 / 0.15 / 0.2 of the fp32 tensor bytes, with a sampled-Gaussian Fisher on
   the last hidden states (``loss_fn``), side by side with uniform int4 g128 MSE (``bench_minilm``'s row of that
   name): min / mean cosine to fp32 on the evaluation sentences and nearest-neighbour agreement.

The digits split: 60 % training (and the Fisher's batches), 20 % validation, 20 % test.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn

from lightning_compress import Budget, compress, quantize
from lightning_compress.adaptive.candidates import layer_candidates, realise
from lightning_compress.adaptive.fisher import diagonal_fisher
from lightning_compress.adaptive.scales import measured_scales
from lightning_compress.demos.data import load_digits_arrays
from lightning_compress.quantization.calibration import feed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import file_size, train
from _timing import RESULTS, machine_info, write_json

Split = tuple[Tensor, Tensor]


def data(seed: int) -> tuple[list[Split], Split, Split]:
    images, labels = load_digits_arrays()
    x, y = torch.from_numpy(images).reshape(len(images), -1), torch.from_numpy(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    a, b = len(x) * 3 // 5, len(x) * 4 // 5
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, a, 64)], (x[a:b], y[a:b]), (x[b:], y[b:])


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    out = model(split[0])
    return 100.0 * float((out.argmax(1) == split[1]).float().mean()), float(F.cross_entropy(out, split[1]))


def rank_correlation(model: nn.Module, batches: list[Split], val: Split) -> dict[str, Any]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    weights = {n: m.weight for n, m in layers.items()}
    fisher = diagonal_fisher(model, weights, batches, feed)
    base = evaluate(model, val)[1]
    candidates = {n: layer_candidates(n, m, m.weight.detach(), fisher[n], 1.0, 0, "mse") for n, m in layers.items()}
    scales = measured_scales(model, weights, fisher, candidates, batches, feed, None, "mse")
    predicted, scaled, squared, measured, ratios = [], [], [], [], {}
    for name, module in layers.items():
        original = module.weight.detach().clone()
        per_layer = []
        for c in candidates[name]:
            if c.score == 0.0:
                continue  # the float layer itself
            approx, _ = realise(original, fisher[name], c, "mse")
            with torch.no_grad():
                module.weight.copy_(approx)
            change = evaluate(model, val)[1] - base
            predicted.append(c.score)
            scaled.append(c.score * scales[name])
            squared.append(float((approx - original).square().sum()))
            measured.append(change)
            per_layer.append(change / c.score)
        with torch.no_grad():
            module.weight.copy_(original)
        ratios[name] = sorted(per_layer)[len(per_layer) // 2]
    return {"candidates": len(predicted), "spearman_fisher": float(spearmanr(predicted, measured)[0]),
            "spearman_dw2": float(spearmanr(squared, measured)[0]),
            "spearman_measured_scale": float(spearmanr(scaled, measured)[0]), "median_measured_over_predicted": ratios}


def side_by_side(model: nn.Module, batches: list[Split], test: Split) -> list[dict[str, Any]]:
    rows = []
    for bits in (2, 3, 4, 6, 8):
        for granularity in ("per_channel", "per_group"):
            uniform = copy.deepcopy(model)
            result = quantize(uniform, bits=bits, granularity=granularity, group_size=32, calibration="mse")
            size = file_size(uniform, result)
            row = {"uniform": f"int{bits} {'g32' if granularity == 'per_group' else 'per-channel'}", "bytes": size}
            row["uniform_acc"], row["uniform_loss"] = evaluate(uniform, test)
            for scale in ("measured", "fisher"):
                adaptive = copy.deepcopy(model)
                started = time.perf_counter()
                planned = compress(adaptive, Budget(size=size), batches, scale=scale)
                row[f"{scale}_s"] = time.perf_counter() - started
                row[f"{scale}_bytes"] = planned.file_bytes
                row[f"{scale}_acc"], row[f"{scale}_loss"] = evaluate(adaptive, test)
                row[f"{scale}_plan"] = [r["label"] for r in planned.plan]
            rows.append(row)
    return rows


def minilm() -> list[dict[str, Any]]:
    import bench_minilm as mini

    st = mini.load_minilm()
    bert = st[0].auto_model
    float_state = copy.deepcopy(bert.state_dict())
    reference = mini.embed(st)
    cal = mini.batches(st, list(mini.CALIBRATION_TEXTS) + mini.doc_paragraphs(48))
    base = file_size(bert)
    generator = torch.Generator().manual_seed(0)

    def loss_fn(output: Any, batch: dict[str, Tensor]) -> Tensor:  # Gaussian Fisher of the token states
        states = output.last_hidden_state
        noise = torch.randn(states.shape, generator=generator)
        mask = batch["attention_mask"].unsqueeze(-1)
        return 0.5 * ((states - (states.detach() + noise)).square() * mask).sum() / states.shape[0]

    rows = []
    uniform = quantize(bert, bits=4, **mini.LOW_BITS)
    rows.append({"scheme": "uniform int4 g128 MSE", "file_x": file_size(bert, uniform) / base,
                 **mini.compare(reference, mini.embed(st))})
    for fraction in (0.12, 0.135, 0.15, 0.2):  # 0.135: the uniform int4 g128 file
        bert.load_state_dict(float_state)
        started = time.perf_counter()
        result = compress(bert, Budget(size=fraction), cal, loss_fn=loss_fn)
        rows.append({"scheme": f"compress(Budget(size={fraction}))", "file_x": (result.file_bytes or 0) / base,
                     "seconds": time.perf_counter() - started, **mini.compare(reference, mini.embed(st)),
                     "plan": sorted({r["label"] for r in result.plan})})
    print(f"\nall-MiniLM-L6-v2 (fp32 file {base / 1e6:.1f} MB), cosine to fp32 on the evaluation sentences")
    for r in rows:
        print(f"  {r['scheme']:<32} file {r['file_x']:.3f}x  min cos {r['min_cos']:.4f}  mean {r['mean_cos']:.4f}  "
              f"NN {r['nn_agreement']:.3f}" + (f"  {r['seconds']:.0f} s" if "seconds" in r else ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed instead of three")
    parser.add_argument("--json", type=Path, default=RESULTS / "adaptive.json")
    parser.add_argument("--minilm", action="store_true", help="also all-MiniLM-L6-v2 (a few minutes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    print(f"torch {torch.__version__}; seeds {seeds}", flush=True)
    out: dict[str, Any] = {"machine": machine_info(args.quick), "seeds": {}}
    for seed in seeds:
        batches, val, test = data(seed)
        started = time.perf_counter()
        model = train(mlp(seed), batches, epochs=30, lr=3e-3)
        fit_s = time.perf_counter() - started
        float_acc, float_loss = evaluate(model, test)
        ranks = rank_correlation(model, batches, val)
        print(f"\nseed {seed}: float test acc {float_acc:.2f} %, loss {float_loss:.4f}, file {file_size(model)} B, "
              f"fit {fit_s:.2f} s (30 epochs)")
        print(f"  Spearman predicted vs measured val-loss change over {ranks['candidates']} candidates: "
              f"1/2 sum(F dW^2) {ranks['spearman_fisher']:.3f}, the same with measured per-layer scales "
              f"{ranks['spearman_measured_scale']:.3f}, sum(dW^2) {ranks['spearman_dw2']:.3f}")
        print("  median measured / predicted per layer: "
              + ", ".join(f"{n}: {r:.3g}" for n, r in ranks["median_measured_over_predicted"].items()))
        rows = side_by_side(model, batches, test)
        print(f"  {'uniform':<16}{'bytes':>7}{'acc %':>7}{'loss':>8} | adaptive, measured scale:          "
              f"{'bytes':>6}{'acc %':>7}{'loss':>8}{'s':>5} | Fisher (default):  {'acc %':>7}{'loss':>8}  plan")
        for r in rows:
            print(f"  {r['uniform']:<16}{r['bytes']:>7}{r['uniform_acc']:>7.2f}{r['uniform_loss']:>8.4f} | "
                  f"{'':>34}{r['measured_bytes']:>6}{r['measured_acc']:>7.2f}{r['measured_loss']:>8.4f}"
                  f"{r['measured_s']:>5.2f} | {'':>17}{r['fisher_acc']:>7.2f}{r['fisher_loss']:>8.4f}  "
                  f"{', '.join(r['measured_plan'])}")
        for scale in ("fisher", "measured"):
            gains = [r[f"{scale}_acc"] - r["uniform_acc"] for r in rows]
            better = sum(r[f"{scale}_loss"] < r["uniform_loss"] for r in rows)
            print(f"  {scale}: test loss lower than uniform at {better}/{len(rows)}, accuracy minus uniform: "
                  f"min {min(gains):+.2f}, mean {sum(gains) / len(gains):+.2f}, max {max(gains):+.2f} points")
        slowest = max(r["fisher_s"] for r in rows)
        print(f"  compress (Fisher, candidates, solve, write, measure): at most {slowest:.2f} s a call, "
              f"{100 * slowest / fit_s:.0f} % of the fit")
        out["seeds"][seed] = {"float_acc": float_acc, "float_loss": float_loss, "fit_s": fit_s, "ranks": ranks,
                              "rows": rows}
    if args.minilm:
        out["minilm"] = minilm()
    write_json(args.json, out)


if __name__ == "__main__":
    main()
