"""Tests for scaling_study.models: presets, exact parameter counts, FLOP counts against
torch's FlopCounterMode on real transformers models, and a hand count for BERT-large.

Big models are built on the meta device: shapes and FLOPs without memory or compute.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

from scaling_study.models import (
    Device,
    ModelPreset,
    bert_config,
    count_encoder_parameters,
    count_non_embedding_parameters,
    count_parameters,
    finetune_train_flops,
    load_devices,
    load_presets,
    mlm_flops_breakdown,
    mlm_train_flops,
)

PRESETS = load_presets()
VOCAB_SIZES = (1_000, 30_522, 50_000)
# Above this, building real weights on CPU costs seconds; meta-device parameters have the same shapes.
MAX_PARAMS_ON_CPU = 20_000_000


def _device_for(preset: ModelPreset, vocab_size: int) -> str:
    return "cpu" if count_parameters(preset, vocab_size) <= MAX_PARAMS_ON_CPU else "meta"


def _build(model_cls, config, device: str, **kwargs):
    with torch.device(device):
        return model_cls(config, **kwargs)


def _numel(module: torch.nn.Module) -> int:
    # parameters() yields a tied tensor once, as count_parameters counts it.
    return sum(p.numel() for p in module.parameters())


# --- presets and devices ------------------------------------------------------------------------


def test_packaged_presets_load_with_expected_shapes():
    assert set(PRESETS) == {"debug", "tiny", "mini", "small", "medium", "base", "large", "xl"}
    shapes = {name: (p.num_layers, p.hidden_size, p.num_heads, p.ffn_size) for name, p in PRESETS.items()}
    assert shapes["tiny"] == (2, 128, 2, 512)
    assert shapes["base"] == (12, 768, 12, 3072)
    assert shapes["large"] == (24, 1024, 16, 4096)
    assert shapes["xl"] == (36, 1280, 20, 5120)
    for name, preset in PRESETS.items():
        assert preset.name == name
        assert preset.max_position_embeddings == 512
        assert preset.description
    assert count_parameters(PRESETS["debug"], 30_522) < count_parameters(PRESETS["tiny"], 30_522)


def test_bert_base_matches_the_published_count():
    # BertForMaskedLM of bert-base-uncased: 109,482,240 (BertModel with pooler) - 590,592 (pooler)
    # + 622,650 (MLM head: transform 589,824 + 768, LayerNorm 1,536, decoder bias 30,522).
    assert count_parameters(PRESETS["base"], 30_522) == 109_514_298


def test_extra_presets_add_and_replace_by_name():
    extra = {
        "large": {"num_layers": 2, "hidden_size": 1024, "num_heads": 16, "ffn_size": 4096},
        "wide": {"num_layers": 4, "hidden_size": 96, "num_heads": 3, "ffn_size": 384, "description": "mine"},
    }
    presets = load_presets(extra=extra)
    assert presets["large"].num_layers == 2
    assert presets["large"].max_position_embeddings == 512
    assert presets["wide"] == ModelPreset(
        name="wide", num_layers=4, hidden_size=96, num_heads=3, ffn_size=384, description="mine"
    )
    assert presets["base"] == PRESETS["base"]
    assert load_presets()["large"].num_layers == 24  # the packaged data is untouched


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_layers": 2, "hidden_size": 100, "num_heads": 3, "ffn_size": 400}, "not divisible"),
        ({"num_layers": 0, "hidden_size": 64, "num_heads": 2, "ffn_size": 256}, "num_layers"),
        ({"num_layers": 2, "hidden_size": -64, "num_heads": 2, "ffn_size": 256}, "hidden_size"),
        ({"num_layers": 2, "hidden_size": 64, "num_heads": 2, "ffn_size": 256.0}, "ffn_size"),
        ({"num_layers": True, "hidden_size": 64, "num_heads": 2, "ffn_size": 256}, "num_layers"),
        ({"num_layers": 2, "hidden_size": 64, "num_heads": 2}, "missing fields"),
        ({"num_layers": 2, "hidden_size": 64, "num_heads": 2, "ffn_size": 256, "vocab_size": 9}, "unknown"),
        ({"name": "other", "num_layers": 2, "hidden_size": 64, "num_heads": 2, "ffn_size": 256}, "name"),
    ],
)
def test_invalid_presets_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        load_presets(extra={"bad": fields})


def test_invalid_preset_dataclass_raises():
    with pytest.raises(ValueError, match="hidden_size 100 is not divisible by num_heads 3"):
        ModelPreset(name="bad", num_layers=2, hidden_size=100, num_heads=3, ffn_size=400)


def test_devices_load():
    devices = load_devices()
    assert set(devices) >= {"h100", "h200", "a100", "cpu"}
    assert devices["h100"].peak_flops == devices["h200"].peak_flops == 989e12
    assert devices["a100"].peak_flops == 312e12
    assert devices["cpu"].peak_flops == 180.8e9
    assert [devices[n].assumed_mfu for n in ("h100", "h200", "a100", "cpu")] == [0.40, 0.40, 0.45, 0.50]
    for device in devices.values():
        assert isinstance(device.peak_flops, float)
        assert device.peak_precision and device.source and device.description
    assert devices["cpu"].estimate_seconds(180.8e9) == pytest.approx(2.0)


def test_devices_extra_and_validation():
    # 2e15 without a dot is a string to PyYAML; load_devices reads it as the number meant.
    devices = load_devices(
        extra={"b200": {"description": "x", "peak_flops": "2e15", "peak_precision": "bf16",
                        "assumed_mfu": 0.4, "source": "y"}}
    )
    assert devices["b200"].peak_flops == 2e15
    with pytest.raises(ValueError, match="assumed_mfu"):
        Device(name="d", description="", peak_flops=1e12, peak_precision="fp32", assumed_mfu=40, source="")


def test_bert_config_passes_settings_and_refuses_shape_overrides():
    config = bert_config(PRESETS["tiny"], 1_000, attn_implementation="eager", hidden_dropout_prob=0.0)
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (1_000, 2, 128)
    assert (config.num_attention_heads, config.intermediate_size, config.type_vocab_size) == (2, 512, 2)
    assert config._attn_implementation == "eager"
    assert config.hidden_dropout_prob == 0.0
    with pytest.raises(ValueError, match="hidden_size"):
        bert_config(PRESETS["tiny"], 1_000, hidden_size=256)


# --- parameter counts ---------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size", VOCAB_SIZES)
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_count_parameters_matches_bert_for_masked_lm(name, vocab_size):
    preset = PRESETS[name]
    model = _build(BertForMaskedLM, bert_config(preset, vocab_size), _device_for(preset, vocab_size))
    assert count_parameters(preset, vocab_size) == _numel(model)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_encoder_and_non_embedding_counts_match_bert_model(name):
    preset = PRESETS[name]
    model = _build(BertModel, bert_config(preset, 30_522), "meta", add_pooling_layer=False)
    assert count_encoder_parameters(preset, 30_522) == _numel(model)
    assert count_non_embedding_parameters(preset) == _numel(model.encoder)


@settings(max_examples=25, deadline=None)
@given(
    num_layers=st.integers(1, 3),
    num_heads=st.integers(1, 4),
    head_size=st.integers(1, 16),
    ffn_size=st.integers(1, 64),
    max_positions=st.integers(1, 64),
    vocab_size=st.integers(1, 500),
)
def test_count_parameters_matches_any_shape(num_layers, num_heads, head_size, ffn_size, max_positions, vocab_size):
    preset = ModelPreset(
        name="h", num_layers=num_layers, hidden_size=num_heads * head_size, num_heads=num_heads,
        ffn_size=ffn_size, max_position_embeddings=max_positions,
    )
    model = _build(BertForMaskedLM, bert_config(preset, vocab_size), "meta")
    assert count_parameters(preset, vocab_size) == _numel(model)


# --- FLOPs: closed form against FlopCounterMode -------------------------------------------------


def _measured_mlm_train_flops(model, batch: int, seq_len: int, num_predicted: int, device: str) -> int:
    """One MLM training step as the pretraining loop runs it: encoder on every token, head only
    at the gathered masked positions, then backward."""
    vocab_size = model.config.vocab_size
    input_ids = torch.randint(vocab_size, (batch, seq_len), device=device)
    # An integer index, not a boolean mask: mask indexing calls nonzero(), which meta tensors lack.
    positions = torch.randperm(batch * seq_len)[:num_predicted].to(device)
    labels = torch.randint(vocab_size, (num_predicted,), device=device)
    with FlopCounterMode(display=False) as counter:
        hidden = model.bert(input_ids=input_ids).last_hidden_state
        logits = model.cls(hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions))
        F.cross_entropy(logits, labels).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    ("name", "vocab_size", "batch", "seq_len", "num_predicted", "device", "attn"),
    [
        ("tiny", 30_522, 5, 128, 96, "cpu", "eager"),
        ("tiny", 30_522, 5, 128, 96, "cpu", "sdpa"),
        # seq 512 so that attention is 8% of the encoder: leaving it out could not pass within 2%.
        ("large", 50_000, 5, 512, 384, "meta", "eager"),
        ("large", 50_000, 5, 512, 384, "meta", "sdpa"),
    ],
)
def test_mlm_train_flops_match_flop_counter(name, vocab_size, batch, seq_len, num_predicted, device, attn):
    preset = PRESETS[name]
    model = _build(BertForMaskedLM, bert_config(preset, vocab_size, attn_implementation=attn), device)
    measured = _measured_mlm_train_flops(model, batch, seq_len, num_predicted, device)
    mask_rate = num_predicted / (batch * seq_len)
    assert mask_rate == 0.15
    predicted = mlm_train_flops(preset, vocab_size, seq_len, batch, mask_rate)
    assert predicted == pytest.approx(measured, rel=0.02)


@settings(max_examples=15, deadline=None)
@given(
    num_layers=st.integers(1, 2),
    num_heads=st.integers(1, 3),
    head_size=st.integers(1, 8),
    ffn_size=st.integers(1, 32),
    vocab_size=st.integers(2, 300),
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 32),
    data=st.data(),
)
def test_mlm_train_flops_match_flop_counter_any_shape(
    num_layers, num_heads, head_size, ffn_size, vocab_size, batch, seq_len, data
):
    preset = ModelPreset(
        name="h", num_layers=num_layers, hidden_size=num_heads * head_size, num_heads=num_heads,
        ffn_size=ffn_size, max_position_embeddings=32,
    )
    num_predicted = data.draw(st.integers(1, batch * seq_len))
    model = _build(BertForMaskedLM, bert_config(preset, vocab_size), "meta")
    measured = _measured_mlm_train_flops(model, batch, seq_len, num_predicted, "meta")
    predicted = mlm_train_flops(preset, vocab_size, seq_len, batch, num_predicted / (batch * seq_len))
    # Same counting rule (matmuls only), so the agreement is exact up to float rounding.
    assert predicted == pytest.approx(measured, rel=1e-9)


@pytest.mark.parametrize(("head", "model_cls"), [("sequence", BertForSequenceClassification),
                                                  ("token", BertForTokenClassification)])
def test_finetune_train_flops_match_flop_counter(head, model_cls):
    preset, vocab_size, batch, seq_len, num_labels = PRESETS["tiny"], 30_522, 4, 128, 5
    model = model_cls(bert_config(preset, vocab_size, num_labels=num_labels))
    input_ids = torch.randint(vocab_size, (batch, seq_len))
    labels = torch.randint(num_labels, (batch, seq_len) if head == "token" else (batch,))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, labels=labels).loss.backward()
    predicted = finetune_train_flops(preset, vocab_size, seq_len, batch, num_labels, head=head)
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_mlm_flops_hand_count_bert_large():
    # BERT-large (the ScholarBERT shape), vocab 50,000, seq 128, 1,000 sequences, 15% masked.
    # Encoder, forward, per token and layer:
    #   projections 2 * (4 * 1024^2 + 2 * 1024 * 4096) = 2 * (4,194,304 + 8,388,608) = 25,165,824
    #   attention   4 * 128 * 1024                                                 =    524,288
    #   per layer 25,690,112; x 24 layers = 616,562,688 per token; x 128,000 tokens:
    encoder_forward = 78_920_024_064_000
    # Head, forward, per predicted position: 2 * 1024^2 + 2 * 1024 * 50,000 = 104,497,152;
    # x 19,200 predicted positions (15% of 128,000):
    head_forward = 2_006_345_318_400
    # Forward + backward = 3 x forward: 236,760,072,192,000 + 6,019,035,955,200.
    total = 242_779_108_147_200  # = 3 * (encoder_forward + head_forward); 1.897e9 per token
    assert total == 3 * (encoder_forward + head_forward)

    breakdown = mlm_flops_breakdown(PRESETS["large"], 50_000, 128, 1_000, 0.15)
    assert breakdown["encoder"] == pytest.approx(3 * encoder_forward, rel=0.02)
    assert breakdown["head"] == pytest.approx(3 * head_forward, rel=0.02)
    assert breakdown["total"] == pytest.approx(total, rel=0.02)
    assert breakdown["per_token"] == pytest.approx(1_896_711_782.4, rel=0.02)
    assert mlm_train_flops(PRESETS["large"], 50_000, 128, 1_000, 0.15) == breakdown["total"]
    # The closed form is exact arithmetic, so it is exactly the hand count too.
    assert breakdown["total"] == total


def test_mlm_flops_breakdown_is_consistent():
    preset = PRESETS["mini"]
    b = mlm_flops_breakdown(preset, 30_522, 128, 32, 0.15)
    assert b["total"] == b["encoder"] + b["head"]
    assert b["tokens"] == 32 * 128 and b["predicted_positions"] == pytest.approx(0.15 * 32 * 128)
    assert b["per_token"] == pytest.approx(b["total"] / b["tokens"])
    # Decoder at every position (Hugging Face's BertForMaskedLM.forward) costs more than at 15%.
    full = mlm_train_flops(preset, 30_522, 128, 32, 1.0)
    assert full > b["total"]
    assert mlm_train_flops(preset, 30_522, 128, 64, 0.15) == pytest.approx(2 * b["total"])
    assert mlm_flops_breakdown(preset, 30_522, 128, 0, 0.15)["per_token"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 513}, "max_position_embeddings"),
        ({"mask_rate": 1.5}, "mask_rate"),
        ({"num_sequences": -1}, "num_sequences"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_mlm_flops_reject_bad_arguments(kwargs, message):
    arguments = {"vocab_size": 30_522, "seq_len": 128, "num_sequences": 10, "mask_rate": 0.15} | kwargs
    with pytest.raises(ValueError, match=message):
        mlm_train_flops(PRESETS["tiny"], **arguments)


def test_replaced_preset_changes_the_counts():
    longer = dataclasses.replace(PRESETS["tiny"], num_layers=4)
    assert count_parameters(longer, 1_000) - count_parameters(PRESETS["tiny"], 1_000) == (
        count_non_embedding_parameters(PRESETS["tiny"])
    )
