"""export_onnx on transformers taking token ids, with no wrapper and no ``result``: a Hugging Face ``BertModel`` and an
``nn.TransformerEncoder`` classifier, int8 and int4 g32. ORT equals PyTorch at batch sizes and sequence lengths the
example did not have; every quantized layer is on an integer operator (embeddings: ``Gather`` of int8 codes) or
named with the reason."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_compress.quantization import quantize
from lightning_compress.quantization.carried import attach
from lightning_compress.serving import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

VOCAB = 120
SCHEMES = {"int8": {"bits": 8}, "int4 g32": {"bits": 4, "granularity": "per_group", "group_size": 32}}
SHAPES = [(3, 7), (5, 23)]  # (batch, tokens), neither the example's (2, 12)


class EncoderClassifier(nn.Module):
    """Token ids and a padding mask in, class logits out (mean over the kept tokens)."""

    def __init__(self, d=64, heads=4, layers=2, classes=5):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(64, d)
        layer = nn.TransformerEncoderLayer(d, heads, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)
        for p in self.encoder.parameters():  # the stack's layers start as copies of one layer
            nn.init.normal_(p, std=0.1)

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.encoder(self.embed(input_ids) + self.pos(positions), src_key_padding_mask=attention_mask == 0)
        keep = attention_mask.unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1))


def _bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _tokens(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # one padded sequence
    return ids, mask


def _quantize(model, scheme):
    result = quantize(model, **SCHEMES[scheme])
    attach(model, {layer.key: layer.qtensor for layer in result.layers.values()}, "quantize()")
    return result


def _compare(path, model, names, output):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, (batch, length) in enumerate(SHAPES):
        ids, mask = _tokens(batch, length, seed=10 + i)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        want = (out[output] if output else out).numpy()
        got = session.run(None, {names[0]: ids.numpy(), names[1]: mask.numpy()})[0]
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    return worst


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_bert_model_directly_from_a_dict_of_token_inputs(tmp_path, scheme):
    torch.manual_seed(0)
    model = _bert()
    _quantize(model, scheme)
    ids, mask = _tokens(2, 12, seed=0)
    report = export_onnx(model, tmp_path / "bert.onnx", {"input_ids": ids, "attention_mask": mask})
    assert report.inputs == ["input_ids", "attention_mask"] and report.outputs == ["last_hidden_state"]
    graph = onnx.load(tmp_path / "bert.onnx").graph
    for value in graph.input:  # int64 ids kept, batch and sequence dynamic
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert report.not_integer == {}, str(report)
    assert report.unused == ["pooler.dense"] and "do not depend on it" in report.layers["pooler.dense"].reason
    qkv = [n for n in report.layers if n.endswith(("query", "key", "value"))]
    assert len(qkv) == 6 and all(report.layers[n].integer for n in qkv)
    expected = {"int8": {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}, "int4 g32": {"MatMulNBits"}}[scheme]
    assert {report.layers[n].runtime_op for n in qkv} <= expected
    assert report.layers["embeddings.word_embeddings"].runtime_op == "Gather"
    codes = {i.name: i for i in graph.initializer}[report.layers["embeddings.word_embeddings"].codes]
    assert codes.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    assert _compare(tmp_path / "bert.onnx", model, report.inputs, "last_hidden_state") < 0.02


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_transformer_encoder_classifier_from_a_tuple_of_token_inputs(tmp_path, scheme):
    torch.manual_seed(1)
    model = EncoderClassifier().eval()
    _quantize(model, scheme)
    report = export_onnx(model, tmp_path / "enc.onnx", _tokens(2, 12, seed=0))
    assert report.inputs == ["input_ids", "attention_mask"] and report.outputs == ["output"]
    assert report.not_integer == {} and report.unused == [], str(report)
    assert {"encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "embed", "head"} <= set(report.layers)
    assert _compare(tmp_path / "enc.onnx", model, report.inputs, None) < 0.02


def test_bert_outputs_by_name_and_the_pooler_then_counts(tmp_path):
    torch.manual_seed(2)
    model = _bert()
    _quantize(model, "int8")
    ids, mask = _tokens(2, 12, seed=0)
    report = export_onnx(model, tmp_path / "b.onnx", {"input_ids": ids, "attention_mask": mask},
                         outputs=["pooler_output", 0], calibration_data=[{"input_ids": ids[:1], "attention_mask":
                                                                           mask[:1], "labels": torch.zeros(1)}])
    assert report.outputs == ["pooler_output", "last_hidden_state"] and report.samples == 3
    assert report.unused == [] and report.layers["pooler.dense"].integer


def test_a_tokenizer_batch_goes_in_as_it_is(tmp_path):
    torch.manual_seed(3)
    model = _bert()
    _quantize(model, "int8")
    ids, mask = _tokens(2, 12, seed=0)
    batch = transformers.BatchEncoding({"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
                                        "attention_mask": mask})
    report = export_onnx(model, tmp_path / "t.onnx", batch)
    assert report.inputs == ["input_ids", "token_type_ids", "attention_mask"] and report.not_integer == {}
    assert report.max_abs_diff < 0.02 * float(model(**batch).last_hidden_state.detach().abs().max())


def test_static_activations_on_a_transformer_classifier(tmp_path):
    torch.manual_seed(4)
    model = EncoderClassifier().eval()
    _quantize(model, "int8")
    calibration = [_tokens(8, 12, seed=s) for s in range(4)]  # (input_ids, attention_mask) tuples
    report = export_onnx(model, tmp_path / "s.onnx", _tokens(2, 12, seed=0), activations="static",
                         calibration_data=calibration)
    assert report.not_integer == {} and report.samples == 34
    assert {report.layers[n].runtime_op for n in report.layers if n not in ("embed", "pos")} <= {"QLinearMatMul",
                                                                                                 "QGemm"}
    assert report.argmax_agreement >= 0.97 and _compare(tmp_path / "s.onnx", model, report.inputs, None) < 0.05


def _drop_head(rows, head, width=16):
    """Keep-mask over q/k/v rows (one block of 64 per projection) without ``head``."""
    keep = torch.ones(rows, dtype=torch.bool)
    for start in range(0, rows, 64):
        keep[start + head * width: start + (head + 1) * width] = False
    return keep


@pytest.mark.parametrize("kind", ["bert", "encoder"])
@pytest.mark.parametrize("scheme", ["int8", "int4 g16"])
def test_compacted_then_quantized_transformers(tmp_path, kind, scheme):
    from lightning_compress.structure.compaction import compact

    torch.manual_seed(5)
    ffn = torch.arange(128) % 4 != 0  # 96 of 128 FFN neurons, 3 of 4 heads
    ids, mask = _tokens(2, 12, seed=0)
    if kind == "bert":
        model, example, output = _bert(), {"input_ids": ids, "attention_mask": mask}, "last_hidden_state"
        masks = {f"encoder.layer.{i}.attention.self.{p}": _drop_head(64, 2) for i in range(2)
                 for p in ("query", "key", "value")}
        masks.update({f"encoder.layer.{i}.intermediate.dense": ffn for i in range(2)})
    else:
        model, example, output = EncoderClassifier().eval(), (ids, mask), None
        masks = {f"encoder.layers.{i}.self_attn": _drop_head(192, 2) for i in range(2)}
        masks.update({f"encoder.layers.{i}.linear1": ffn for i in range(2)})
    small = compact(model, masks, example).model.eval()
    widths = {tuple(small.get_submodule(name).weight.shape) for name in masks if "self_attn" not in name
              and name.endswith(("intermediate.dense", "linear1"))}
    assert widths == {(96, 64)}  # really smaller
    spec = {"bits": 8} if scheme == "int8" else {"bits": 4, "granularity": "per_group", "group_size": 16}
    result = quantize(small, **spec)
    attach(small, {layer.key: layer.qtensor for layer in result.layers.values()}, "quantize()")
    report = export_onnx(small, tmp_path / "c.onnx", example)
    assert report.not_integer == {}, str(report)
    ffn_in = [layer for name, layer in report.layers.items() if name.endswith(("output.dense", "linear2"))
              and "attention" not in name]
    assert len(ffn_in) == 2 and all(layer.integer for layer in ffn_in)
    assert _compare(tmp_path / "c.onnx", small, report.inputs, output) < 0.02


@pytest.mark.parametrize("embedding_bits", [8, 4])
def test_lightnings_demo_transformer_keeps_its_shared_embedding_table_integer(tmp_path, embedding_bits):
    """Lightning's demo language model looks up source and target ids in one table: two ``Gather`` nodes read it.
    Both read our codes (int8 ``Gather``, 4-bit ``GatherBlockQuantized``) from one table in the file; its decoder's
    cross-attention projects query and memory with one MatMul on the whole ``in_proj_weight`` (integer too); ORT
    equals PyTorch at lengths the example did not have."""
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=64, nlayers=1, dropout=0.0).eval()
    _ = quantize(model, bits=4, granularity="per_group", group_size=32, embedding_bits=embedding_bits)
    ids, target = _tokens(2, 10, seed=0)[0], _tokens(2, 10, seed=1)[0]
    report = export_onnx(model, tmp_path / "lm.onnx", (ids, target))
    embedding = report.layers["embedding"]
    assert embedding.integer and embedding.runtime_op == ("Gather" if embedding_bits == 8 else
                                                         "GatherBlockQuantized"), str(report)
    assert report.not_integer == {}, str(report)
    assert report.layers["transformer.decoder.layers.0.multihead_attn"].runtime_op == "MatMulNBits"
    graph = onnx.load(str(tmp_path / "lm.onnx"))
    tables = [i for i in graph.graph.initializer if i.name.startswith("embedding.weight_quantized")]
    assert len(tables) == 1 and not [i for i in graph.graph.initializer if i.name == "embedding.weight"]
    readers = [n for n in graph.graph.node if tables[0].name in n.input]
    assert len(readers) == 2  # the source and the target lookups
    session = ort.InferenceSession(str(tmp_path / "lm.onnx"), providers=["CPUExecutionProvider"])
    for batch, length in SHAPES:
        ids, target = _tokens(batch, length, seed=3)[0], _tokens(batch, length, seed=4)[0]
        with torch.no_grad():
            want = model(ids, target).numpy()
        got = session.run(None, dict(zip(report.inputs, (ids.numpy(), target.numpy()))))[0]
        assert got.shape == want.shape and np.abs(got - want).max() < 0.05 * np.abs(want).max()
