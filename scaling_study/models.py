"""Model-size presets, parameter counts and training-FLOP estimates for BERT-style MLMs.

Usage::

    from transformers import BertForMaskedLM
    from scaling_study.models import (
        load_presets, load_devices, bert_config, count_parameters, mlm_train_flops, pretrain_factors,
    )

    presets = load_presets()                      # packaged presets/model_sizes.yaml
    large = presets["large"]                      # 24 layers, hidden 1024: the ScholarBERT shape
    model = BertForMaskedLM(bert_config(large, vocab_size=50_000))
    count_parameters(large, 50_000)               # == sum(p.numel() for p in model.parameters())

    flops = mlm_train_flops(large, 50_000, seq_len=128, num_sequences=1_000_000, mask_rate=0.15)
    pretrain_factors(large, 50_000, 1_000, study.spec.pretrain)   # tokens, parameters, FLOPs of 1,000 steps
    gpu = load_devices()["h100"]
    gpu.estimate_seconds(flops)                   # flops / (peak_flops * assumed_mfu)
    load_corpus_rates()["default"].pack_rate      # bytes of text per core-second (presets/corpus_rates.yaml)

    # A size of your own (same fields as the YAML), or a changed packaged one:
    presets = load_presets(extra={"wide": {"num_layers": 4, "hidden_size": 1024,
                                           "num_heads": 16, "ffn_size": 4096}})

Presets are data (``presets/*.yaml``); the vocabulary size is a corpus setting and is passed
separately everywhere. FLOP counts are closed-form and are checked in the tests against
``torch.utils.flop_counter.FlopCounterMode`` on real models.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from transformers import BertConfig

__all__ = [
    "CorpusRates",
    "Device",
    "ModelPreset",
    "PretrainFactors",
    "bert_config",
    "count_encoder_parameters",
    "count_non_embedding_parameters",
    "count_parameters",
    "finetune_train_flops",
    "load_corpus_rates",
    "load_devices",
    "load_presets",
    "mlm_flops_breakdown",
    "mlm_train_flops",
    "pretrain_factors",
]

# Forward + backward: the backward pass computes a gradient for both the input and the weight
# of every matmul, each as costly as the forward matmul.
TRAIN_FLOPS_PER_FORWARD_FLOP = 3
# BERT's segment embeddings (sentence A / B); fixed by the architecture, not a size choice.
TYPE_VOCAB_SIZE = 2


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """Shape of a BERT encoder, independent of the vocabulary."""

    name: str
    """Registry key, e.g. ``"large"``."""
    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width; a multiple of ``num_heads``."""
    num_heads: int
    """Attention heads."""
    ffn_size: int
    """Inner width of each layer's feed-forward block."""
    max_position_embeddings: int = 512
    """Longest sequence the model accepts (size of the learned position table)."""
    description: str = ""
    """One line for listings."""

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_heads", "ffn_size", "max_position_embeddings"):
            _check_positive_int(f"model preset {self.name!r}: {field}", getattr(self, field))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model preset {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True, kw_only=True)
class Device:
    """An accelerator (or CPU) for turning FLOP counts into time estimates."""

    name: str
    """Registry key, e.g. ``"h100"``."""
    description: str
    """One line for listings."""
    peak_flops: float
    """Peak dense throughput in FLOP/s at ``peak_precision``."""
    peak_precision: str
    """Number format ``peak_flops`` refers to, e.g. ``"bf16"``."""
    assumed_mfu: float
    """Fraction of ``peak_flops`` a training run is assumed to reach (model FLOPs utilisation)."""
    source: str
    """Where ``peak_flops`` and ``assumed_mfu`` come from."""

    def __post_init__(self) -> None:
        if not _is_number(self.peak_flops) or self.peak_flops <= 0:
            raise ValueError(f"device {self.name!r}: peak_flops must be a positive number, got {self.peak_flops!r}")
        if not _is_number(self.assumed_mfu) or not 0 < self.assumed_mfu <= 1:
            raise ValueError(f"device {self.name!r}: assumed_mfu must be in (0, 1], got {self.assumed_mfu!r}")

    @property
    def effective_flops(self) -> float:
        """FLOP/s a training run is assumed to sustain: ``peak_flops * assumed_mfu``."""
        return self.peak_flops * self.assumed_mfu

    def estimate_seconds(self, flops: float) -> float:
        """Wall-clock seconds for ``flops`` model FLOPs on one such device."""
        return flops / self.effective_flops


@dataclass(frozen=True, kw_only=True)
class CorpusRates:
    """What one CPU core does per second in a corpus build, in bytes of UTF-8 input text
    (``presets/corpus_rates.yaml``; ``costs`` turns them into CPU-hours)."""

    name: str
    """Registry key, e.g. ``"default"``."""
    description: str
    """One line for listings."""
    scan_rate: float
    """The one pass over the whole corpus (documents, keys, histograms)."""
    pack_rate: float
    """Tokenizing and packing a volume's documents."""
    train_rate: float
    """Training a volume's tokenizer on its sample, in one process."""
    source: str
    """Where the rates come from."""

    def __post_init__(self) -> None:
        for key in ("scan_rate", "pack_rate", "train_rate"):
            value = getattr(self, key)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"corpus rates {self.name!r}: {key} must be a positive number of bytes per "
                                 f"core-second, got {value!r}")


def load_presets(extra: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, ModelPreset]:
    """The packaged model-size presets, plus ``extra`` ones added or replacing them by name.

    Each ``extra`` entry gives the full preset (the fields of ``model_sizes.yaml``); an entry
    whose name is packaged replaces that preset whole rather than merging into it, so what
    runs is exactly what the user wrote.
    """
    entries = dict(_read_packaged_yaml("model_sizes.yaml"))
    entries.update(extra or {})
    return {name: _build(ModelPreset, name, fields, "model preset") for name, fields in entries.items()}


def load_devices(extra: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Device]:
    """The packaged devices (``devices.yaml``), plus ``extra`` ones added or replacing them by name."""
    entries = dict(_read_packaged_yaml("devices.yaml"))
    entries.update(extra or {})
    return {name: _build(Device, name, _floats(fields, ("peak_flops", "assumed_mfu")), "device")
            for name, fields in entries.items()}


def load_corpus_rates(extra: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, CorpusRates]:
    """The packaged corpus-build rates (``corpus_rates.yaml``), plus ``extra`` ones added or replacing them by name."""
    entries = dict(_read_packaged_yaml("corpus_rates.yaml"))
    entries.update(extra or {})
    return {name: _build(CorpusRates, name, _floats(fields, ("scan_rate", "pack_rate", "train_rate")), "corpus rates")
            for name, fields in entries.items()}


def bert_config(preset: ModelPreset, vocab_size: int, **overrides: Any) -> BertConfig:
    """A ``transformers.BertConfig`` of ``preset`` shape; other settings are BERT's defaults.

    ``overrides`` go to ``BertConfig`` (e.g. ``attn_implementation="sdpa"``,
    ``hidden_dropout_prob=0.0``, ``num_labels=5``). Shape fields are refused there: change the
    preset instead, so that the parameter and FLOP counts here keep describing the model.
    """
    _check_positive_int("vocab_size", vocab_size)
    shape = {
        "vocab_size": vocab_size,
        "hidden_size": preset.hidden_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_heads,
        "intermediate_size": preset.ffn_size,
        "max_position_embeddings": preset.max_position_embeddings,
        "type_vocab_size": TYPE_VOCAB_SIZE,
    }
    clash = sorted(shape.keys() & overrides.keys())
    if clash:
        raise ValueError(
            f"bert_config: {clash} are set by the preset and vocab_size; use another preset "
            f"(dataclasses.replace(preset, ...)) instead of overriding them"
        )
    return BertConfig(**shape, **overrides)


# --- parameter counts ---------------------------------------------------------------------------


def count_non_embedding_parameters(preset: ModelPreset) -> int:
    """Parameters of the transformer layers only: the ``N`` of Kaplan et al. (2020) scaling laws.

    Per layer: Q, K, V, O projections with biases, two LayerNorms (weight and bias),
    FFN in and out with biases.
    """
    h, f = preset.hidden_size, preset.ffn_size
    attention = 4 * (h * h + h)
    ffn = (h * f + f) + (f * h + h)
    layer_norms = 2 * 2 * h
    return preset.num_layers * (attention + ffn + layer_norms)


def count_encoder_parameters(preset: ModelPreset, vocab_size: int) -> int:
    """Parameters of ``BertModel(config, add_pooling_layer=False)``: what a finetuned model
    inherits from pretraining (embeddings and layers, no MLM head, no pooler)."""
    _check_positive_int("vocab_size", vocab_size)
    h = preset.hidden_size
    embeddings = (vocab_size + preset.max_position_embeddings + TYPE_VOCAB_SIZE) * h + 2 * h
    return embeddings + count_non_embedding_parameters(preset)


def count_parameters(preset: ModelPreset, vocab_size: int) -> int:
    """Exact parameter count of ``BertForMaskedLM(bert_config(preset, vocab_size))``.

    Encoder (``count_encoder_parameters``) plus the MLM head: transform dense (h x h + bias)
    and LayerNorm, and the decoder bias. The decoder weight is tied to the word embeddings,
    so it is counted once, there. ``BertForMaskedLM`` has no pooler.
    """
    h = preset.hidden_size
    head = (h * h + h) + 2 * h + vocab_size
    return count_encoder_parameters(preset, vocab_size) + head


# --- FLOPs --------------------------------------------------------------------------------------


def _encoder_forward_flops_per_token(preset: ModelPreset, seq_len: int) -> int:
    h, f = preset.hidden_size, preset.ffn_size
    projections = 2 * (4 * h * h + 2 * h * f)  # Q, K, V, O and FFN in, out: 2 FLOPs per MAC
    attention = 4 * seq_len * h  # scores Q·K^T and the weighted sum of V, over all heads
    return preset.num_layers * (projections + attention)


def mlm_flops_breakdown(
    preset: ModelPreset, vocab_size: int, seq_len: int, num_sequences: float, mask_rate: float
) -> dict[str, float]:
    """Training FLOPs of MLM pretraining, split into encoder and head.

    The encoder runs on every token; the MLM head (transform + decoder) runs only at the
    ``mask_rate * tokens`` predicted positions, as in a loop that gathers masked positions
    before the head. (Hugging Face's ``BertForMaskedLM.forward`` runs the head on every
    token; for that, pass ``mask_rate=1.0``.)

    Counted, as 2 FLOPs per multiply-accumulate of every matmul, forward, times 3 for
    forward + backward:

    - encoder, per token and layer: ``2 * (4h^2 + 2h*ffn)`` for the Q, K, V, O projections and
      the two FFN matmuls, plus ``4 * seq_len * h`` for the attention scores (Q·K^T) and the
      attention-weighted sum of V;
    - head, per predicted position: ``2h^2`` for the transform dense layer and ``2h * vocab``
      for the decoder.

    Ignored: embedding lookups (an index, not a matmul; their backward is a scatter-add),
    LayerNorm, softmax, GELU, dropout, residual and bias adds, and the loss. They are
    element-wise, O(h) per token and layer against O(h^2) for the matmuls: roughly
    ``50h + 5 * heads * seq_len`` FLOPs (about 5 per element for LayerNorm and softmax, 8 for
    GELU) against ``24h^2 + 4 * seq_len * h``, a share of about 2/h. That is 0.2% for
    ``large``, under 1% from ``mini`` (h=256) up, and 1.5-3.5% only for ``tiny`` and ``debug``,
    whose runtime overheads dwarf it anyway. They are memory-bound, so they cost more time
    than their FLOPs suggest; that shows up as a lower MFU, which is where the usual MFU
    convention (matmul FLOPs only, as in PaLM) puts it. ``FlopCounterMode`` applies the same
    rule: with ``mask_rate`` equal to the exact fraction of gathered positions, the two agree
    exactly. Padding positions count as tokens: the encoder computes them.

    Returns ``encoder``, ``head``, ``total`` (FLOPs), ``per_token`` (total / tokens),
    ``tokens`` and ``predicted_positions``.
    """
    _check_positive_int("vocab_size", vocab_size)
    _check_seq_len(preset, seq_len)
    if not _is_number(num_sequences) or num_sequences < 0:
        raise ValueError(f"num_sequences must be a non-negative number, got {num_sequences!r}")
    if not _is_number(mask_rate) or not 0 <= mask_rate <= 1:
        raise ValueError(f"mask_rate must be in [0, 1], got {mask_rate!r}")

    h = preset.hidden_size
    tokens = num_sequences * seq_len
    predicted = mask_rate * tokens
    encoder = TRAIN_FLOPS_PER_FORWARD_FLOP * tokens * _encoder_forward_flops_per_token(preset, seq_len)
    head = TRAIN_FLOPS_PER_FORWARD_FLOP * predicted * (2 * h * h + 2 * h * vocab_size)
    total = encoder + head
    return {
        "encoder": float(encoder),
        "head": float(head),
        "total": float(total),
        "per_token": float(total / tokens) if tokens else 0.0,
        "tokens": float(tokens),
        "predicted_positions": float(predicted),
    }


def mlm_train_flops(
    preset: ModelPreset, vocab_size: int, seq_len: int, num_sequences: float, mask_rate: float
) -> float:
    """Training FLOPs (forward + backward) of MLM pretraining; see ``mlm_flops_breakdown``."""
    return mlm_flops_breakdown(preset, vocab_size, seq_len, num_sequences, mask_rate)["total"]


@dataclass(frozen=True)
class PretrainFactors:
    """What a pretraining run up to some step amounts to: the derived factors of `plan`, the
    MLflow runs and the results table, computed here only (`pretrain_factors`)."""

    tokens: int
    """Tokens seen: steps x batch_size x seq_len."""
    parameters: int | None = None
    """Exact parameter count of the `BertForMaskedLM` (``count_parameters``)."""
    flops: float | None = None
    """Training FLOPs, forward and backward (``mlm_flops_breakdown``'s total) ..."""
    flops_encoder: float | None = None
    """... of which the encoder's ..."""
    flops_head: float | None = None
    """... and the MLM head's."""


def pretrain_factors(preset: ModelPreset | None, vocab_size: int | None, steps: int, recipe: Any) -> PretrainFactors:
    """Tokens, parameters and FLOPs of `steps` steps of pretraining `preset` with `recipe` (anything
    with ``batch_size``, ``seq_len`` and ``mask_rate``: a spec.PretrainSpec, a PretrainConfig).

    Without the preset or the vocabulary size (the corpus build's, which can be smaller than the
    spec's target), only the tokens are known.
    """
    sequences = int(steps) * recipe.batch_size
    tokens = sequences * recipe.seq_len
    if preset is None or vocab_size is None:
        return PretrainFactors(tokens=tokens)
    flops = mlm_flops_breakdown(preset, int(vocab_size), recipe.seq_len, sequences, recipe.mask_rate)
    return PretrainFactors(tokens=tokens, parameters=count_parameters(preset, int(vocab_size)), flops=flops["total"],
                           flops_encoder=flops["encoder"], flops_head=flops["head"])


def finetune_train_flops(
    preset: ModelPreset,
    vocab_size: int,
    seq_len: int,
    num_sequences: float,
    num_labels: int,
    *,
    head: Literal["sequence", "token"] = "sequence",
) -> float:
    """Training FLOPs (forward + backward) of finetuning the whole encoder with a classifier.

    The encoder runs on every token, counted as in ``mlm_flops_breakdown``. The classifier:

    - ``head="sequence"`` (``BertForSequenceClassification``): per sequence, the pooler
      dense layer on [CLS] (``2h^2``) and the classifier (``2h * num_labels``);
    - ``head="token"`` (``BertForTokenClassification``): per token, the classifier
      (``2h * num_labels``).

    ``vocab_size`` does not change the compute (embedding lookups are not counted); it is
    validated and kept for symmetry with ``mlm_train_flops``.
    """
    _check_positive_int("vocab_size", vocab_size)
    _check_positive_int("num_labels", num_labels)
    _check_seq_len(preset, seq_len)
    if not _is_number(num_sequences) or num_sequences < 0:
        raise ValueError(f"num_sequences must be a non-negative number, got {num_sequences!r}")

    h = preset.hidden_size
    tokens = num_sequences * seq_len
    if head == "sequence":
        classifier = num_sequences * (2 * h * h + 2 * h * num_labels)
    elif head == "token":
        classifier = tokens * 2 * h * num_labels
    else:
        raise ValueError(f"head must be 'sequence' or 'token', got {head!r}")
    encoder = tokens * _encoder_forward_flops_per_token(preset, seq_len)
    return float(TRAIN_FLOPS_PER_FORWARD_FLOP * (encoder + classifier))


# --- helpers ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)  # read once per process: every spec load asks for the presets
def _read_packaged_yaml(filename: str) -> Mapping[str, Mapping[str, Any]]:
    text = importlib.resources.files("scaling_study").joinpath("presets", filename).read_text(encoding="utf-8")
    data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"presets/{filename}: expected a mapping of name -> fields, got {type(data).__name__}")
    return data


def _floats(fields: Any, keys: tuple[str, ...]) -> Any:
    """`fields` with the numbers PyYAML left as strings (1e15: no dot, no exponent sign) read as
    floats: accept what the user meant. Anything else is left for `_build` to judge."""
    if not isinstance(fields, Mapping):
        return fields
    fields = dict(fields)
    for key in keys:
        if isinstance(fields.get(key), str):
            try:
                fields[key] = float(fields[key])
            except ValueError:
                pass
    return fields


def _build(cls: type, name: str, fields: Mapping[str, Any], kind: str):
    if not isinstance(fields, Mapping):
        raise ValueError(f"{kind} {name!r}: expected a mapping of fields, got {type(fields).__name__}")
    fields = dict(fields)
    if fields.setdefault("name", name) != name:
        raise ValueError(f"{kind} {name!r}: its 'name' field says {fields['name']!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(fields.keys() - known.keys())
    if unknown:
        raise ValueError(f"{kind} {name!r}: unknown fields {unknown}; known: {sorted(known)}")
    missing = sorted(
        k
        for k, f in known.items()
        if k not in fields and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ValueError(f"{kind} {name!r}: missing fields {missing}")
    return cls(**fields)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_int(what: str, value: object) -> None:
    # bool is an int subclass, and YAML turns `yes` into True; a size of True is a typo.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _check_seq_len(preset: ModelPreset, seq_len: int) -> None:
    _check_positive_int("seq_len", seq_len)
    if seq_len > preset.max_position_embeddings:
        raise ValueError(
            f"seq_len {seq_len} exceeds max_position_embeddings {preset.max_position_embeddings} "
            f"of model preset {preset.name!r}"
        )
