"""Heads and FFN neurons of three transformers this project did not write: Lightning's demo Transformer (torch.fx
cannot trace it), a stock nn.TransformerEncoder classifier, and a Hugging Face BERT (small BertConfig, no download).
Found by the analysis, removed by compaction with the masked model's outputs, fewer parameters, reloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from lightning.pytorch.demos import Transformer
from torch import nn

from lightning_compress.structure.attention import PrunedMultiheadAttention
from lightning_compress.structure.compaction import compact, count_parameters, load_compacted, save_compacted
from lightning_compress.structure.dependency import UnitGroup, find_unit_groups

transformers = pytest.importorskip("transformers")


class EncoderClassifier(nn.Module):
    def __init__(self, vocab: int = 30, width: int = 32, heads: int = 4, ffn: int = 48) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embedding(ids)).mean(1))


def bert(attention: str = "sdpa") -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=16, num_labels=3, attn_implementation=attention,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def heads_mask(group: UnitGroup, kept: list[int]) -> torch.Tensor:
    """Keep-mask over the group's rows keeping the listed heads (in every part)."""
    per_head = torch.zeros(group.num_blocks, dtype=torch.bool)
    per_head[kept] = True
    return per_head.repeat_interleave(group.block).repeat(group.parts)


def masked(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The model as pruning leaves it: the removed rows of weight and bias zeroed (in_proj for attention)."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in masks.items():
            module = modules[name]
            for p in (getattr(module, "in_proj_weight", None), getattr(module, "in_proj_bias", None),
                      getattr(module, "weight", None), getattr(module, "bias", None)):
                if p is not None and p.shape[0] == keep.numel():
                    p[~keep] = 0
    return model


def run(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(*inputs)
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------------------- nn.TransformerEncoder
def test_encoder_heads_and_ffn_groups() -> None:
    groups = find_unit_groups(EncoderClassifier(), torch.randint(0, 30, (2, 7)))
    attention = groups["encoder.layers.0.self_attn"]
    assert (attention.num_units, attention.parts, attention.block, attention.num_blocks) == (96, 3, 8, 4)
    assert attention.prunable and attention.consumers == [("encoder.layers.0.self_attn.out_proj", 1, 0)]
    ffn = groups["encoder.layers.1.linear1"]
    assert ffn.prunable and ffn.consumers == [("encoder.layers.1.linear2", 1, 0)] and ffn.block == 1
    # out_proj is a NonDynamicallyQuantizableLinear: analysed as a Linear, refused because of the LayerNorm
    assert "encoder.layers.0.norm1` (LayerNorm)" in groups["encoder.layers.0.self_attn.out_proj"].reason
    assert groups["encoder.layers.0.linear2"].reason.startswith("units reach `encoder.layers.0.norm2`")
    assert groups["head"].reason == "model output"
    assert attention.macs == 2 * 7 * 32 * 96 and attention.attention_macs == 2 * 2 * 7 * 7 * 32


def test_encoder_compaction_equals_masked_and_reloads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model, x = EncoderClassifier(), torch.randint(0, 30, (3, 7))
    groups = find_unit_groups(model, x)
    masks = {
        "encoder.layers.0.self_attn": heads_mask(groups["encoder.layers.0.self_attn"], [0, 3]),
        "encoder.layers.1.self_attn": heads_mask(groups["encoder.layers.1.self_attn"], [2]),
        "encoder.layers.0.linear1": torch.arange(48) % 3 != 0,
    }
    reference = run(masked(model, masks), x)
    assert not torch.allclose(reference, run(model, x), atol=1e-3)  # the masks do change the model
    result = compact(model, masks, x)
    layers = result.model.encoder.layers
    assert isinstance(layers[0].self_attn, PrunedMultiheadAttention)
    assert (layers[0].self_attn.num_heads, layers[1].self_attn.num_heads) == (2, 1)
    assert layers[0].self_attn.in_proj_weight.shape == (3 * 16, 32) and layers[0].self_attn.out_proj.in_features == 16
    assert (layers[0].linear1.out_features, layers[0].linear2.in_features) == (32, 32)
    assert result.params_after == count_parameters(result.model) < result.params_before
    torch.testing.assert_close(run(result.model, x), reference, atol=1e-5, rtol=1e-5)
    result.model.train()(x).sum().backward()  # trains, and the fused fast path never sees the pruned attention
    save_compacted(result.model, tmp_path / "encoder.safetensors")
    fresh = load_compacted(EncoderClassifier(), tmp_path / "encoder.safetensors")
    assert fresh.encoder.layers[1].self_attn.num_heads == 1
    torch.testing.assert_close(run(fresh, x), run(result.model, x), atol=0, rtol=0)


# ---------------------------------------------------------------------------- Lightning's demo Transformer
def test_demo_transformer_is_analysed_through_its_control_flow() -> None:
    model, x = Transformer(vocab_size=40, ninp=32, nhead=4, nhid=48, nlayers=1), torch.randint(0, 40, (2, 6))
    groups = find_unit_groups(model, (x, x))
    prunable = sorted(n for n, g in groups.items() if g.prunable)
    assert prunable == [
        "transformer.decoder.layers.0.linear1", "transformer.decoder.layers.0.multihead_attn",
        "transformer.decoder.layers.0.self_attn", "transformer.encoder.layers.0.linear1",
        "transformer.encoder.layers.0.self_attn",
    ]
    assert groups["decoder"].reason == "`log_softmax` normalizes over the units"
    masks = {n: heads_mask(groups[n], [1, 2]) for n in prunable if groups[n].parts == 3}
    masks["transformer.decoder.layers.0.linear1"] = torch.arange(48) < 20
    reference = run(masked(model, masks), x, x)
    result = compact(model, masks, (x, x))
    assert result.model.transformer.decoder.layers[0].multihead_attn.num_heads == 2
    assert result.params_after < result.params_before
    torch.testing.assert_close(run(result.model, x, x), reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- Hugging Face BERT
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_bert_heads_are_coupled_qkv_blocks(attention: str) -> None:
    groups = find_unit_groups(bert(attention), torch.randint(0, 30, (2, 9)))
    prefix = "bert.encoder.layer.1.attention.self"
    query = groups[f"{prefix}.query"]
    assert query.prunable and query.block == 8 and query.num_blocks == 4
    assert sorted(query.coupled) == [f"{prefix}.key", f"{prefix}.value"]
    assert query.consumers == [("bert.encoder.layer.1.attention.output.dense", 1, 0)]
    assert query.attention_macs == 2 * 2 * 9 * 9 * 32  # q @ k and p @ v, shrink with the heads
    assert groups["bert.encoder.layer.1.intermediate.dense"].consumers == [("bert.encoder.layer.1.output.dense", 1, 0)]
    assert "LayerNorm" in groups["bert.encoder.layer.1.output.dense"].reason


def test_bert_compaction_updates_head_counts_and_reloads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, ids = bert(), torch.randint(0, 30, (3, 9))
    groups = find_unit_groups(model, ids)
    prefix = "bert.encoder.layer.0.attention.self"
    heads = heads_mask(groups[f"{prefix}.query"], [0, 2, 3])
    masks = {f"{prefix}.query": heads, f"{prefix}.key": heads, f"{prefix}.value": heads,
             "bert.encoder.layer.1.intermediate.dense": torch.arange(48) >= 30}
    reference = run(masked(model, masks), ids)
    result = compact(model, masks, ids)
    attention = result.model.bert.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size, attention.query.out_features) == (3, 24, 24)
    assert result.model.bert.encoder.layer[0].attention.output.dense.in_features == 24
    assert result.params_after < result.params_before
    torch.testing.assert_close(run(result.model, ids), reference, atol=1e-5, rtol=1e-5)
    save_compacted(result.model, tmp_path / "bert.safetensors")
    fresh = load_compacted(bert(), tmp_path / "bert.safetensors")
    assert fresh.bert.encoder.layer[0].attention.self.num_attention_heads == 3
    torch.testing.assert_close(run(fresh, ids), run(result.model, ids), atol=0, rtol=0)


def test_a_head_goes_only_when_q_k_and_v_all_drop_it() -> None:
    model, ids = bert(), torch.randint(0, 30, (2, 9))
    groups = find_unit_groups(model, ids)
    prefix = "bert.encoder.layer.0.attention.self"
    result = compact(model, {f"{prefix}.query": heads_mask(groups[f"{prefix}.query"], [0, 1]),
                             f"{prefix}.value": heads_mask(groups[f"{prefix}.query"], [1, 2])}, ids)
    assert result.units[f"{prefix}.key"] == (32, 32)  # key keeps every head: nothing goes
    rows = torch.ones(32, dtype=torch.bool)
    rows[3] = False  # one row of head 0 only: the head stays whole
    result = compact(model, {f"{prefix}.query": rows, f"{prefix}.key": rows, f"{prefix}.value": rows}, ids)
    assert result.units[f"{prefix}.query"] == (32, 32)


class _MeanPooledBert(nn.Module):
    """A BERT encoder whose classifier reads the mean of the last hidden states: the pooler runs, unused."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = bert().bert
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=ids).last_hidden_state.mean(1))


def test_bert_pooler_of_a_mean_pooled_model_is_dead_code() -> None:
    groups = find_unit_groups(_MeanPooledBert(), torch.randint(0, 30, (2, 7)))
    assert groups["bert.pooler.dense"].dead and "dead code" in groups["bert.pooler.dense"].reason
    assert not any(g.dead for n, g in groups.items() if n != "bert.pooler.dense")
    assert groups["bert.encoder.layer.0.intermediate.dense"].prunable
    live = find_unit_groups(bert(), torch.randint(0, 30, (2, 7)))  # the classifier reads the pooler: not dead
    assert not live["bert.pooler.dense"].dead
