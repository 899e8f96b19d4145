"""Compress an already trained plain ``nn.Module``, without a Trainer: remove the weakest hidden neurons
(structured compaction: a genuinely smaller dense model), then quantize the weights to 4-bit integers, export,
and reload the export into a fresh model.

    python examples/compress_pretrained.py                    # trains a small MLP first (seconds), then compresses
    python examples/compress_pretrained.py --weights my_mlp.safetensors   # or start from your own weights
    python examples/compress_pretrained.py --epochs 2 --keep 0.5          # a smoke run

Data: scikit-learn's 1,797 real 8x8 digits (``pip install 'lightning-compress[data]'``). Every size printed is the
size of a file written to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_compress.demos.data import load_digits_arrays
from lightning_compress.quantization import load_quantized, quantize, save_quantized
from lightning_compress.structure.compaction import compact, count_parameters, save_compacted


def build_mlp(hidden: tuple[int, int] = (128, 64)) -> nn.Sequential:
    h1, h2 = hidden
    return nn.Sequential(nn.Flatten(), nn.Linear(64, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10))


def digits_splits(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    images, labels = load_digits_arrays()  # (1797, 1, 8, 8) in [0, 1], int64 labels
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    x, y = torch.from_numpy(images)[order], torch.from_numpy(labels)[order]
    n_test = len(y) // 5
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int) -> None:
    x, y = data
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = data
    return (model(x).argmax(dim=1) == y).float().mean().item()


def weakest_units_dropped(model: nn.Sequential, keep: float) -> dict[str, torch.Tensor]:
    """Keep-masks over the hidden neurons: each hidden Linear keeps its ``keep`` fraction of output rows with the
    largest L2 norm (the output layer keeps all 10 classes)."""
    masks = {}
    for name in ("1", "3"):  # the two hidden Linear layers of build_mlp
        norms = model.get_submodule(name).weight.detach().norm(dim=1)
        n_keep = max(1, round(keep * norms.numel()))
        mask = torch.zeros_like(norms, dtype=torch.bool)
        mask[norms.topk(n_keep).indices] = True
        masks[name] = mask
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="safetensors state_dict of build_mlp() to start from (default: train one)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs when no --weights (and fine-tuning)")
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of hidden neurons kept by compaction")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--out", default="runs/compress_pretrained")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    train_data, test_data = digits_splits()

    # 1. the "pretrained" model
    model = build_mlp()
    if args.weights:
        model.load_state_dict(load_file(args.weights))
    else:
        train(model, train_data, args.epochs)
    save_file(model.state_dict(), out / "model.fp32.safetensors")
    report = [("float32", accuracy(model, test_data), out / "model.fp32.safetensors", count_parameters(model))]

    # 2. structured compaction: drop the weakest hidden neurons (their rows, bias entries and the next layer's
    #    columns), a short fine-tune to recover, and save the smaller dense model
    result = compact(model, weakest_units_dropped(model, args.keep), torch.zeros(2, 1, 8, 8), inplace=True)
    print(f"compaction: {result}")
    train(model, train_data, max(1, args.epochs // 3))
    save_compacted(model, out / "model.compact.fp32.safetensors")
    report.append(("compacted float32", accuracy(model, test_data), out / "model.compact.fp32.safetensors",
                   count_parameters(model)))

    # 3. post-training quantization of the compacted model, in place (weights hold their dequantized values)
    quantized = quantize(model, bits=args.bits, granularity="per_channel", calibration="mse")
    export = out / f"model.compact.int{args.bits}.safetensors"
    save_quantized(model, quantized, export)
    print("SQNR per layer (dB):", {name: round(value, 1) for name, value in quantized.sqnr().items()})

    # 4. what you ship: reload the export into a fresh model of the compacted shape and check it
    hidden = (model.get_submodule("1").out_features, model.get_submodule("3").out_features)
    reloaded = load_quantized(build_mlp(hidden), export)
    report.append((f"compacted int{args.bits} (reloaded)", accuracy(reloaded, test_data), export,
                   count_parameters(reloaded)))
    torch.testing.assert_close(reloaded(test_data[0]), copy.deepcopy(model).eval()(test_data[0]))

    fp32_bytes = report[0][2].stat().st_size
    print(f"\n{'model':<28}{'test acc':>9}{'params':>9}{'file bytes':>12}{'ratio':>8}")
    for label, acc, path, params in report:
        size = path.stat().st_size
        print(f"{label:<28}{acc:>9.4f}{params:>9,}{size:>12,}{fp32_bytes / size:>7.2f}x")


if __name__ == "__main__":
    main()
