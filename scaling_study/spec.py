"""The study spec: one YAML file declares a factorial scaling study.

    from scaling_study.spec import load_spec
    study = load_spec("experiments/smoke.yaml")     # raises SpecErrors (exit code 2 in the CLI)
    study.spec.pretrain.steps, study.volumes, study.tasks["bc5cdr_ner"].type

The YAML mirrors the dataclasses below field for field; each field is documented where it is
declared. Validation happens here, before anything runs: unknown keys, wrong types, empty or
duplicate levels, unknown presets or tasks, non-increasing steps, fractions outside (0, 1],
conflicting options. Every problem is one line naming the file, line, field path, the value and
what is allowed. `load_spec` writes nothing.

Factors and their levels: `model_sizes` x `data_volumes` x `pretrain.steps` x `finetune.epochs`
x `tasks.include` x `finetune.seeds` (plus `external_models`, evaluated like the pretrained ones).
Sizes, volumes, tasks, seeds and external models are sets: their order in the file does not
matter. Steps and epochs are points along one training run, so they are written in increasing
order.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Discriminator, Tag
from pydantic.dataclasses import dataclass

from scaling_study.errors import SpecError, SpecErrors
from scaling_study.yamlio import format_path, line_of, read_yaml, unwrap_type, validate

_CONFIG = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME_ALLOWED = "1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
MAX_SEED = 2**32 - 1
"""Seeds go to numpy (`np.random.seed` takes 32 bits), torch and Ray (64 bits signed)."""
MIN_VOCAB_SIZE = 100
"""The 5 special tokens and a bare alphabet; below this nothing is a vocabulary. WordPiece keeps every
character of the corpus and its `##` continuation (about 300 tokens for English abstracts, 2,900 for
the mirror's science corpus), and the corpus build refuses a `vocab_size` smaller than that."""


def is_name(value: str) -> bool:
    """A study, model or corpus name: a plain folder name (`fullmatch`: `$` would let a newline end it)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None and ".." not in value


def _name(value: str) -> str:
    if not is_name(value):
        raise ValueError(f"not a valid name; allowed: {_NAME_ALLOWED}")
    return value


def _seed(value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"out of range; allowed: a seed from 0 to 2**32 - 1 ({MAX_SEED:,})")
    return value


def _vocab_size(value: int) -> int:
    if value < MIN_VOCAB_SIZE:
        raise ValueError(f"too small for a WordPiece vocabulary (5 special tokens, every character of the corpus "
                         f"and its ## form, then merges); allowed: at least {MIN_VOCAB_SIZE:,}")
    return value


def _levels(value: list, *, increasing: bool = False) -> list:
    if not value:
        raise ValueError("empty list of levels; allowed: at least one level")
    seen = set()
    for item in value:
        if item in seen:
            raise ValueError(f"duplicate level {item!r}; allowed: each level once")
        seen.add(item)
    if increasing and any(b <= a for a, b in zip(value, value[1:])):
        raise ValueError("levels must be strictly increasing; allowed: e.g. [1000, 10000, 100000]")
    return value


def _positive(value: float) -> float:
    if not value > 0 or math.isinf(value):
        raise ValueError("must be positive; allowed: a number > 0")
    return value


def _non_negative(value: float) -> float:
    if not value >= 0 or math.isinf(value):
        raise ValueError("must not be negative; allowed: a number >= 0")
    return value


def _fraction(value: float, *, open_low: bool = False, open_high: bool = False, what: str = "") -> float:
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        raise ValueError(f"out of range; allowed: {what or 'a fraction'} in {interval}")
    return value


Name = Annotated[str, AfterValidator(_name)]
PosInt = Annotated[int, AfterValidator(_positive)]
PosFloat = Annotated[float, AfterValidator(_positive)]
NonNegFloat = Annotated[float, AfterValidator(_non_negative)]
Fraction01 = Annotated[float, AfterValidator(_fraction)]  # [0, 1]
Seed = Annotated[int, AfterValidator(_seed)]


# ----------------------------------------------------------------------------------- data volumes

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_VOLUME_ALLOWED = ("a fraction in (0, 1] (0.01), a percentage ('1%'), or a token count "
                   "(an integer > 1, or '2.2B', '500M', '100k')")


@dataclasses.dataclass(frozen=True, order=True)
class DataVolume:
    """One data-volume level: a fraction of the corpus's documents, or a number of tokens."""

    fraction: float | None = None
    tokens: int | None = None

    @property
    def label(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if self.tokens >= scale:
                return f"{self.tokens / scale:g}{suffix} tokens"
        return f"{self.tokens} tokens"

    def key(self) -> dict:
        """What the corpus-build id hashes."""
        return {"fraction": self.fraction} if self.fraction is not None else {"tokens": self.tokens}


def parse_volume(value: Any) -> DataVolume:
    """`0.1`, `'10%'` -> fraction 0.1; `2_200_000_000`, `'2.2B'`, `2.2e9` -> tokens."""
    if isinstance(value, DataVolume):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"not a data volume; allowed: {_VOLUME_ALLOWED}")
    if isinstance(value, str):
        text = value.strip().lower().replace("_", "").replace(",", "").removesuffix("tokens").strip()
        try:
            if text.endswith("%"):
                number = float(text[:-1]) / 100
                if not 0 < number <= 1:
                    raise ValueError
                return DataVolume(fraction=round(number, 12))
            if text and text[-1] in _SUFFIX:
                value = float(text[:-1]) * _SUFFIX[text[-1]]
            else:
                value = float(text)
        except ValueError:
            raise ValueError(f"not a data volume; allowed: {_VOLUME_ALLOWED}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"fraction outside (0, 1]; allowed: {_VOLUME_ALLOWED}")
    if value <= 1:
        return DataVolume(fraction=float(value))
    if value != int(value):
        raise ValueError(f"fraction outside (0, 1] and not a whole token count; allowed: {_VOLUME_ALLOWED}")
    return DataVolume(tokens=int(value))


Volume = Annotated[Any, BeforeValidator(parse_volume)]


# ----------------------------------------------------------------------------------- corpus reading

MIN_TOKENIZER_SAMPLE = 1_000
"""Bytes: below this a tokenizer sample is a typo (`1000` meant as `1000M`), not a sample."""
MAX_TOKENIZER_SAMPLE = 2**31 - 1
"""Bytes: the `tokenizers` WordPiece trainer counts character pairs in 32-bit integers (`count_pairs`
adds `counts[i] as i32`); a pair's count is at most the sample's characters, so a sample below
2**31 bytes cannot wrap (and give a vocabulary of negative-frequency merges)."""
_BYTE_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_BYTES = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmg]?)(?:b|bytes)?")
_SAMPLE_ALLOWED = (f"a number of bytes from {MIN_TOKENIZER_SAMPLE:,} to 2**31 - 1: an integer (500000000), or "
                   "with a decimal suffix ('500M', '1.5G', '1GB'; k = 10**3, M = 10**6, G = 10**9)")


def parse_bytes(value: Any) -> Any:
    """`'500M'`, `'1GB'`, `'1.5G'`, `2e9`, `1_000_000` -> an int of bytes (decimal suffixes, as `plan`
    prints sizes); anything else is left for the type check to refuse."""
    if isinstance(value, float) and not isinstance(value, bool) and math.isfinite(value) and value == int(value):
        return int(value)
    if not isinstance(value, str):
        return value
    match = _BYTES.fullmatch(value.strip().lower().replace("_", "").replace(",", ""))
    if not match:
        raise ValueError(f"not a number of bytes; allowed: {_SAMPLE_ALLOWED}")
    number = float(match.group(1)) * _BYTE_SUFFIX[match.group(2)]
    if number != int(number):
        raise ValueError(f"not a whole number of bytes; allowed: {_SAMPLE_ALLOWED}")
    return int(number)


def _tokenizer_sample(value: int) -> int:
    if value < MIN_TOKENIZER_SAMPLE:
        raise ValueError(f"too small to train a tokenizer on; allowed: {_SAMPLE_ALLOWED}")
    if value > MAX_TOKENIZER_SAMPLE:
        raise ValueError("2**31 bytes or more: the WordPiece trainer counts character pairs in 32-bit integers, "
                         f"which a larger sample can overflow; allowed: {_SAMPLE_ALLOWED}")
    return value


def _text_field(value: str) -> str:
    if not value:
        raise ValueError("empty; allowed: the JSON key or Parquet column holding each document, e.g. 'text'")
    return value


# ----------------------------------------------------------------------------------- spec tree


@dataclass(config=_CONFIG, kw_only=True)
class CorpusSpec:
    """The pretraining corpus: UTF-8 text files with one document per line, JSON lines, or Parquet
    files (`format`), plain or gzip/zstd-compressed, on local disks or object stores."""

    name: Name
    """Short name of the corpus. With `version` and the sources it identifies the corpus in every id."""
    paths: list[str] = field(default_factory=list)
    """Corpus files or folders, read in place: local paths (relative ones resolve against the spec's
    folder; `${VAR}` and `${VAR:-default}` expand from the environment), or URIs `s3://bucket/key`,
    `gs://bucket/key`, `file:///abs/path` (an S3-compatible server is named in `$AWS_ENDPOINT_URL`). A
    folder, a prefix ending in `/` or an object-store directory contributes its files with the format's
    suffixes, sorted by name, not recursing: `text` `.txt`, `.txt.gz`, `.txt.zst`; `jsonl` `.jsonl`,
    `.jsonl.gz`, `.jsonl.zst`, `.json.gz`; `parquet` `.parquet`. A file named here is read whatever its
    name; `.gz` and `.zst` ones are decompressed."""
    urls: list[str] = field(default_factory=list)
    """Public URLs (`https://`, `file://`) of corpus files, downloaded once into `<storage.root>/cache`
    (needs a network; `$SCALING_STUDY_OFFLINE=1` refuses the download); read after `paths`. Object-store
    URIs belong in `paths`, read in place."""
    format: Literal["text", "jsonl", "parquet"] = "text"
    """How documents are stored: `text`, one per line (blank lines skipped); `jsonl`, one JSON object per
    line whose `text_field` holds the document (null ones skipped); `parquet`, the string column
    `text_field`. Trailing newlines are stripped and blank documents skipped in every format, so a line of a
    text file and the same string in JSONL or Parquet are the same document."""
    text_field: Annotated[str, AfterValidator(_text_field)] = "text"
    """The JSON key (`jsonl`) or Parquet column (`parquet`) holding each document; unused by `text`."""
    tokenizer_sample: Annotated[int, BeforeValidator(parse_bytes), AfterValidator(_tokenizer_sample)] = 1_000_000_000
    """Bytes of UTF-8 text each volume's tokenizer is trained on at most: the volume's smallest-key
    documents (a uniform sample of it). An integer or '500M', '1GB' (decimal: G = 10**9); from 1,000
    to 2**31 - 1, since the WordPiece trainer counts pairs in 32-bit integers."""
    version: str = "1"
    """Bump it when the files change: the corpus is identified by name, version and sources, not content."""
    total_tokens: PosFloat | None = None
    """Tokens in the whole corpus, if known (ScholarBERT's: 221e9). `plan` uses it to size fractional
    volumes; when null, `plan` estimates it from the files' sizes."""
    vocab_size: Annotated[int, AfterValidator(_vocab_size)] = 30522
    """WordPiece vocabulary size; one tokenizer is trained per data volume (ScholarBERT: 50,000); at
    least 100 and at least the corpus's alphabet (5 special tokens, each character and its `##` form)."""
    cased: bool = True
    """Keep letter case in the tokenizer (ScholarBERT is cased)."""
    min_frequency: PosInt = 2
    """Minimum count for a WordPiece merge to enter the vocabulary."""
    seed: Seed = 0
    """Seed of the per-document hash keys that draw the nested subsets (the 1% inside the 10%)."""


@dataclass(config=_CONFIG, kw_only=True)
class PresetSpec:
    """A user-defined model size (BERT encoder shape); the packaged ones are in presets/model_sizes.yaml."""

    num_layers: PosInt
    """Transformer layers."""
    hidden_size: PosInt
    """Hidden width; a multiple of `num_heads`."""
    num_heads: PosInt
    """Attention heads."""
    ffn_size: PosInt
    """Width of the feed-forward block (4 x hidden in BERT)."""
    max_position_embeddings: PosInt = 512
    """Longest sequence the model can take."""
    description: str = ""
    """One line for `plan` and the MLflow tags."""


@dataclass(config=_CONFIG, kw_only=True)
class _PretrainAxis:
    """The steps axis (the spec's alone: a run gets its `total_steps` and checkpoint levels from the plan)."""

    steps: Annotated[list[PosInt], AfterValidator(lambda v: _levels(v, increasing=True))]
    """Step levels (optimizer steps), strictly increasing. Each level yields a checkpoint."""
    protocol: Literal["trajectory", "independent"] = "trajectory"
    """`trajectory`: one run per size x volume, scheduled over the largest level, with a checkpoint at
    each level. `independent`: one run per level, each with its own full schedule."""
    random_init: bool = False
    """The control arm: also finetune, per size x volume, the weights pretraining starts from (a
    checkpoint at step 0, written by the run before its first step: the seeded initialisation,
    with that volume's tokenizer). Results show it as `steps` 0; the report compares it with the
    largest steps level ("pretraining vs none"). `independent`: the run of the smallest level writes it."""


@dataclass(config=_CONFIG, kw_only=True)
class PretrainRecipe:
    """What shapes one pretraining run, each setting and its default written once: the spec's
    `pretrain` section validates it, and the runtime `pretrain.PretrainConfig` inherits it (as a
    plain dataclass, unvalidated, so code and tests construct it directly)."""

    batch_size: PosInt = 256
    """Global batch in sequences per optimizer step (across workers and accumulation)."""
    seq_len: PosInt = 128
    """Tokens per packed sequence; also the packing length of the corpus builds."""
    lr: PosFloat = 5e-4
    """Peak learning rate."""
    schedule: Literal["linear", "cosine", "wsd", "constant"] = "linear"
    """Decay after warmup: linear or cosine to `min_lr_ratio`, `wsd` (warmup-stable-decay: flat, then
    linear decay over the last `decay_fraction`), or constant."""
    warmup_fraction: Fraction01 = 0.06
    """Share of the run's steps spent in linear warmup."""
    decay_fraction: Fraction01 = 0.2
    """`wsd` only: share of the run's steps spent decaying at the end."""
    min_lr_ratio: Fraction01 = 0.0
    """Final LR as a fraction of `lr`."""
    weight_decay: NonNegFloat = 0.01
    """AdamW/LAMB weight decay (not applied to biases and LayerNorm)."""
    mask_rate: Annotated[float, AfterValidator(lambda v: _fraction(v, open_low=True, open_high=True))] = 0.15
    """Share of tokens selected for prediction (then 80% [MASK], 10% random, 10% unchanged)."""
    optimizer: Literal["adamw", "lamb"] = "adamw"
    """AdamW (fused where available) or LAMB (large-batch BERT training)."""
    betas: Annotated[list[Fraction01], AfterValidator(lambda v: _pair(v, "betas"))] = field(
        default_factory=lambda: [0.9, 0.98])
    """Adam betas (beta1, beta2)."""
    eps: PosFloat = 1e-6
    """Adam epsilon."""
    grad_clip: PosFloat | None = 1.0
    """Clip the global gradient norm to this value; null turns clipping off."""
    precision: Literal["fp32", "bf16"] = "bf16"
    """bf16 autocast (with TF32 matmuls on GPU) or plain fp32. Part of every pretraining id."""
    seed: Seed = 0
    """Seed of initialisation, masking and data order (0 to 2**32 - 1)."""
    grad_accum: PosInt = 1
    """Micro-batches accumulated per optimizer step (batch_size = workers x micro-batch x grad_accum)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Data parallel (DDP) or sharded (FSDP2 `fully_shard`, for large models)."""
    checkpoint_every: PosInt | None = None
    """Extra resume-only checkpoints every N steps (besides the step levels; under `resume/`, only the
    latest kept); null: only the levels."""
    log_every: PosInt = 50
    """Steps between metric logs (to MLflow, rank 0) and Ray reports."""
    compile: bool = False
    """`torch.compile` the encoder (not part of the run's id: the same math). Faster on GPU (BERT-large
    bf16 on an H200: +6%); on CPU it measured no faster and the compile takes a minute or more."""


@dataclass(config=_CONFIG, kw_only=True)
class PretrainSpec(PretrainRecipe, _PretrainAxis):
    """MLM pretraining: the steps axis, the recipe of one run, and the resources it runs on."""

    num_workers: PosInt = 1
    """Ray Train workers (one process each; DDP or FSDP across them). One worker trains in a Ray
    task of its own, without a worker group (Train's local mode; Ray retries the task as Train
    would restart the group)."""
    gpus_per_worker: NonNegFloat = 0
    """GPUs per worker; 0 trains on CPU."""
    cpus_per_worker: PosInt = 1
    """CPU cores reserved per worker."""


def _pair(value: list, name: str) -> list:
    if len(value) != 2:
        raise ValueError(f"{name} needs exactly two numbers; allowed: [beta1, beta2], e.g. [0.9, 0.98]")
    return value


@dataclass(config=_CONFIG, kw_only=True)
class AdaptiveSeeds:
    """Seeds given out in waves (`scaling_study.adaptive`): `min` seeds for every cell, then one more
    seed at a time only for cells in a comparison that is not settled yet, up to `max`."""

    min: Annotated[int, AfterValidator(lambda v: _at_least(v, 2))] = 2
    """Seeds every cell gets (0..min-1). Intervals need 3 seeds, so comparisons are first judged at 3."""
    max: Annotated[int, AfterValidator(lambda v: _at_least(v, 3))] = 10
    """Seeds a cell gets at most (0..max-1); the plan holds all of them, so its ids are those of a
    study with `seeds: [0, ..., max-1]`."""
    threshold: NonNegFloat = 1.0
    """F1 points a step must buy (`analysis.verdict`): a comparison is settled once its interval
    shows a gain above it, rules such a gain out, or shows a loss below minus it."""
    confidence: Annotated[float, AfterValidator(lambda v: _fraction(v, open_low=True, open_high=True))] = 0.95
    """Chance that every interval of a comparison, at every wave, covers its true change (a
    sequential correction spends 1 - confidence over the waves); a wrong verdict is at most this likely."""
    futility: Annotated[float, AfterValidator(lambda v: _fraction(v, open_high=True))] = 0.2
    """Stop giving a comparison seeds once the chance that `max` seeds would settle it, predicted
    from its seeds so far, is below this (it stays "inconclusive" unless the seeds its cells get for
    other comparisons settle it); 0 never stops for futility."""


@dataclass(config=_CONFIG, kw_only=True)
class SeedRule:
    """`seeds: {adaptive: {...}}`: seeds decided while the study runs."""

    adaptive: AdaptiveSeeds
    """How many seeds each cell gets, decided from the results so far (`AdaptiveSeeds`)."""


def _at_least(value: int, low: int) -> int:
    if value < low:
        raise ValueError(f"too small; allowed: an integer >= {low}")
    return value


def _seeds_shape(value: Any) -> Any:
    if not isinstance(value, (list, dict)):
        raise ValueError("not seeds; allowed: a list of seeds ([0, 1, 2]) or {adaptive: {min: 2, max: 10}}")
    return value


def _seeds_arm(value: Any) -> str:
    # the tags are words yamlio drops from an error's field path
    return "dict" if isinstance(value, dict) or hasattr(value, "adaptive") else "list"


Seeds = Annotated[Annotated[Annotated[list[Seed], AfterValidator(_levels)], Tag("list")]
                  | Annotated[SeedRule, Tag("dict")], Discriminator(_seeds_arm), BeforeValidator(_seeds_shape)]


@dataclass(config=_CONFIG, kw_only=True)
class _FinetuneAxes:
    """The finetune-time and seed axes (the spec's alone: a run gets its epoch levels and seed from the plan)."""

    epochs: Annotated[list[PosInt], AfterValidator(lambda v: _levels(v, increasing=True))]
    """Epoch levels, strictly increasing. With `trajectory` one run per (model, task, seed) is
    evaluated after each level; with `independent` each level is its own run."""
    seeds: Seeds = field(default_factory=lambda: [0])
    """Seeds (0 to 2**32 - 1); each fixes head initialisation, data order and dropout, so a seed
    repeats its score. A list, or `{adaptive: {min: 2, max: 10, threshold: 1.0, confidence: 0.95}}`: seeds 0, 1, ... given
    out in waves while the study runs, more only where a comparison is not settled (`AdaptiveSeeds`)."""

    @property
    def adaptive(self) -> AdaptiveSeeds | None:
        """The adaptive rule, or None for a fixed list of seeds."""
        return self.seeds.adaptive if isinstance(self.seeds, SeedRule) else None

    @property
    def seed_levels(self) -> list[int]:
        """Every seed the plan holds, sorted: the list, or 0..max-1 of an adaptive rule."""
        rule = self.adaptive
        return list(range(rule.max)) if rule else sorted(self.seeds)


@dataclass(config=_CONFIG, kw_only=True)
class FinetuneRecipe:
    """What shapes one finetuning run, written once: the spec's `finetune` section validates it,
    and the runtime `finetune.FinetuneConfig` inherits it (a plain dataclass, unvalidated)."""

    protocol: Literal["trajectory", "independent"] = "trajectory"
    """Same choice as for pretraining steps: `trajectory` is one run scheduled over the largest level
    and scored at every level, `independent` one run per level."""
    lr: PosFloat = 2e-5
    """Peak learning rate (AdamW)."""
    batch_size: PosInt = 32
    """Examples per optimizer step."""
    max_seq_len: PosInt = 128
    """Sub-word tokens per example, special tokens included (longer inputs are truncated)."""
    warmup_fraction: Fraction01 = 0.1
    """Share of the run's steps spent in linear warmup; then linear decay to 0."""
    weight_decay: NonNegFloat = 0.01
    """AdamW weight decay (not on biases and LayerNorm weights)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast or fp32."""
    batches: Literal["random", "by_length"] = "random"
    """How each epoch's training examples are cut into batches (a batch is padded to its longest example).
    `random`: a seeded shuffle cut into batches of `batch_size`, the usual recipe (every result before
    this field used it). `by_length`: batches of similar lengths, as Hugging Face Trainer's
    `group_by_length`: the same shuffle is cut into groups of 50 batches, each group is sorted by length
    and cut into batches, and the batches are then shuffled. Far less padding: on the smoke study's tasks
    (batch 16) 1.04-1.05x the real tokens instead of 1.9-2.2x, and a CPU finetune run's training took
    10-12 s instead of 20 s. A slightly different recipe (a batch's examples are not drawn independently
    of their length), so results differ from `random`; a finetune run's node id names it only when it
    is not `random`."""


@dataclass(config=_CONFIG, kw_only=True)
class FinetuneSpec(FinetuneRecipe, _FinetuneAxes):
    """Finetuning on the downstream tasks: the finetune-time axis and seeds, the recipe, the resources."""

    gpus_per_job: NonNegFloat = 0
    """GPUs per finetune job (Ray Tune trial); 0 runs on CPU."""
    cpus_per_job: PosInt = 1
    """CPU cores per finetune job."""
    max_concurrent: PosInt | None = None
    """At most this many finetune jobs at once; null: as many as resources allow."""


@dataclass(config=_CONFIG, kw_only=True)
class TaskCaps:
    """Per-task caps on examples (a quick study subsamples; the full study does not)."""

    max_train_examples: PosInt | None = None
    """Use at most this many training examples (a seeded sample); null: all."""
    max_dev_examples: PosInt | None = None
    """At most this many dev examples; null: all."""
    max_test_examples: PosInt | None = None
    """At most this many test examples; null: all (the full study must use all)."""


@dataclass(config=_CONFIG, kw_only=True)
class TasksSpec(TaskCaps):
    """Downstream tasks: which, where their data is, and optional caps (which apply to every task)."""

    include: Annotated[list[str], AfterValidator(_levels)]
    """Task ids or suite names (`paper12`, `ner`, `re`, `cls`, `all`, ...); see `scaling-study tasks list`."""
    per_task: dict[str, TaskCaps] = field(default_factory=dict)
    """Caps for single tasks, overriding the defaults above field by field."""
    registry_paths: list[str] = field(default_factory=list)
    """Extra folders holding task folders (`<id>/task.yaml`); relative to the spec's folder; `${VAR}` expands."""
    data_dir: str | None = None
    """Local mirror of the task data (`<data_dir>/<task id>/<file>`), relative to the spec's folder (`${VAR}` expands);
    or an object-store URI (`s3://bucket/tasks`), synced to each node before its trials load a task.
    `$SCALING_STUDY_DATA_DIR` overrides it. Null: download from each task's source into the cache."""


@dataclass(config=_CONFIG, kw_only=True)
class ExternalModel:
    """A published checkpoint evaluated with the same finetuning protocol as the pretrained ones."""

    name: Name
    """Short name used in tables and MLflow tags."""
    source: str
    """A Hugging Face model id (`allenai/scibert_scivocab_cased`) or a local folder."""
    revision: str | None = None
    """Hub revision (commit, tag or branch) to pin; part of the id."""
    do_lower_case: bool | None = None
    """Whether the tokenizer lowercases, for a model whose files do not say (no `do_lower_case` in its
    tokenizer_config.json or config.json, no tokenizer.json); null: the model's files decide, and
    finetuning refuses a model that leaves it open."""
    num_parameters: PosInt | None = None
    """Parameter count, for `plan` and the scaling fits (the model is not downloaded to plan)."""
    description: str = ""
    """One line: what the model is."""


@dataclass(config=_CONFIG, kw_only=True)
class TrackingSpec:
    """Where results are logged."""

    uri: str | None = None
    """MLflow tracking URI (`${VAR}` expands). Null: a local MLflow server (sqlite) that the tool starts on 127.0.0.1."""
    experiment: str | None = None
    """MLflow experiment name; null: the study's name."""


@dataclass(config=_CONFIG, kw_only=True)
class StorageSpec:
    """Where corpus builds, checkpoints and caches go."""

    root: str = "studies"
    """Storage root: a local or shared folder (relative to the working directory), or a URI
    (`s3://bucket/prefix`, `gs://bucket/prefix`, `file:///abs/path`) whose files are staged and
    cached on each machine under `$SCALING_STUDY_CACHE` (default `~/.cache/scaling-study`);
    `${VAR}` expands. A study writes under `<root>/<study name>/`."""


@dataclass(config=_CONFIG, kw_only=True)
class StudySpec:
    """One factorial scaling study."""

    name: Name
    """Study name, the study's identity: the MLflow experiment and the folder under the storage root. A
    different spec under a name already run is refused unless `run --extend` (`scaling_study.studies`)."""
    description: str = ""
    """What the study asks."""
    corpus: CorpusSpec | None = None
    """The pretraining corpus (required when `model_sizes` is set)."""
    model_sizes: Annotated[list[str], AfterValidator(_levels)] | None = None
    """Model-size levels: preset names (`debug`, `tiny`, `mini`, `small`, `medium`, `base`, `large`,
    `xl`, or one of `model_presets`)."""
    model_presets: dict[str, PresetSpec] = field(default_factory=dict)
    """Extra model sizes defined in this spec, by name."""
    data_volumes: Annotated[list[Volume], AfterValidator(_levels)] | None = None
    """Data-volume levels: fractions of the corpus (0.01, '10%') or token counts ('2.2B'); all of one
    kind. Nested: each smaller subset lies inside each larger one."""
    pretrain: PretrainSpec | None = None
    """Pretraining settings (required when `model_sizes` is set)."""
    finetune: FinetuneSpec
    """Finetuning settings."""
    tasks: TasksSpec
    """Downstream tasks."""
    external_models: list[ExternalModel] = field(default_factory=list)
    """Published models evaluated like the pretrained ones (the paper's baselines)."""
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    """MLflow tracking."""
    storage: StorageSpec = field(default_factory=StorageSpec)
    """Storage root."""


# ----------------------------------------------------------------------------------- resolution


@dataclasses.dataclass(frozen=True)
class Study:
    """A validated spec plus what it refers to, resolved: the input of `grid.expand`."""

    spec: StudySpec
    file: str
    """The spec file as given (for messages); relative paths in the spec resolve against its folder."""
    presets: dict  # name -> models.ModelPreset, the sizes this study uses
    volumes: tuple[DataVolume, ...]
    """Data volumes, smallest first."""
    tasks: dict  # id -> tasks.registry.TaskInfo, sorted by id
    caps: dict  # id -> TaskCaps with defaults applied
    folder: str = ""
    """The spec's folder as an absolute path, fixed at load time: Ray Tune runs trials in other
    working directories, where a relative spec path would resolve elsewhere."""

    @property
    def base_dir(self) -> Path:
        return Path(self.folder) if self.folder else Path(self.file).resolve().parent

    def resolve_path(self, path: str) -> Path:
        return resolve_path(path, self.base_dir)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """`${VAR}` and `${VAR:-default}` from the environment (a missing VAR without default stays)."""
    return _ENV.sub(lambda m: os.environ.get(m.group(1), m.group(2) if m.group(2) is not None else m.group(0)), text)


def resolve_path(path: str, base_dir: Path) -> Path:
    p = Path(expand_env(path)).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def load_spec(file: str | Path, text: str | None = None) -> Study:
    """Read, validate and resolve a study spec; raises `SpecErrors` listing every problem found."""
    data, lines = read_yaml(file, text)
    return spec_from_data(data, str(file), lines)


def spec_from_data(data: Any, file: str = "<spec>", lines: dict | None = None) -> Study:
    """Validate plain data (as parsed from YAML) into a `Study`.

    The types and ranges come from the dataclasses above; then one check per section, in this
    order, for what spans fields or needs the presets, the storage schemes or the task registry.
    Every problem found is collected; `SpecErrors` lists them all.
    """
    lines = lines or {}
    spec: StudySpec = validate(StudySpec, data, file, lines)
    err = _Problems(file, lines)
    base_dir = Path(file).resolve().parent
    _check_sections(spec, err)
    presets = _check_model_sizes(spec, err)
    volumes = _check_data_volumes(spec, err)
    _check_storage(spec, err)
    _check_tracking(spec, err)
    _check_corpus(spec, err)
    _check_pretrain(spec, err)
    _check_seeds(spec, err)
    _check_external_models(spec, presets, err)
    tasks = _check_tasks(spec, base_dir, err)
    if err.errors:
        raise SpecErrors(err.errors)
    return Study(spec=spec, file=file, presets=presets, volumes=volumes, tasks=tasks, caps=_task_caps(spec, tasks),
                 folder=str(base_dir))


def check_local_paths(study: Study) -> None:
    """Folders the spec names that must exist where the study runs: `tasks.data_dir` and external
    models given as local folders. `run` checks them before anything starts; `validate` does not
    (a spec may be validated where its data is not, e.g. before `submit`)."""
    err = _Problems(study.file, {})
    data_dir = study.spec.tasks.data_dir
    if data_dir and not study.resolve_path(data_dir).is_dir():
        err(("tasks", "data_dir"), data_dir, "an existing folder of <task id>/<split file> (relative to the "
            "spec's folder; ${VAR} expands), or null to download each task's data",
            problem=f"no such folder: {study.resolve_path(data_dir)}")
    for i, model in enumerate(study.spec.external_models):
        local = model.source.startswith((".", "/", "~", "$"))  # as artifacts.model_source reads it
        if local and not study.resolve_path(model.source).is_dir():
            err(("external_models", i, "source"), model.source, "a Hugging Face model id, or an existing folder "
                "holding config.json and the weights", problem=f"no such folder: {study.resolve_path(model.source)}")
    if err.errors:
        raise SpecErrors(err.errors)


class _Problems:
    """Collects one `SpecError` per call, with the line of the field it names."""

    def __init__(self, file: str, lines: dict):
        self.file, self.lines, self.errors = file, lines, []

    def __call__(self, path: tuple, value: Any = SpecError._MISSING, allowed: str = "", problem: str = "") -> None:
        self.errors.append(SpecError(self.file, format_path(path), value, allowed, problem=problem,
                                     line=line_of(self.lines, path)))


_PRETRAINING_SECTIONS = ("corpus", "data_volumes", "pretrain")


def _check_sections(spec: StudySpec, err: _Problems) -> None:
    """The pretraining sections come with model_sizes, and a study evaluates something."""
    if spec.model_sizes is not None:
        for key in _PRETRAINING_SECTIONS:
            if getattr(spec, key) is None:
                err((key,), problem="required when model_sizes is set",
                    allowed="a corpus, data_volumes and pretrain section, or no model_sizes (external models only)")
        return
    for key in _PRETRAINING_SECTIONS:
        if getattr(spec, key) is not None:
            err((key,), problem="set without model_sizes",
                allowed="model_sizes with it, or remove it for a study of external models only")
    if not spec.external_models:
        err(("model_sizes",), problem="nothing to evaluate",
            allowed="model_sizes (pretrain models) and/or external_models")
    if spec.model_presets:
        err(("model_presets",), problem="set without model_sizes", allowed="model_sizes that use them")


def _check_model_sizes(spec: StudySpec, err: _Problems) -> dict:
    """The presets of the study's sizes (name -> models.ModelPreset); pretrain.seq_len fits them all."""
    from scaling_study.models import load_presets

    try:
        available = load_presets({k: dataclasses.asdict(v) for k, v in spec.model_presets.items()})
    except ValueError as exc:
        err(("model_presets",), problem=str(exc), allowed="num_layers, hidden_size a multiple of num_heads, ...")
        available = load_presets()
    presets = {}
    for i, size in enumerate(spec.model_sizes or []):
        if size not in available:
            err(("model_sizes", i), size, f"a preset name: {', '.join(available)} (or define it in model_presets)",
                problem="unknown model size")
        else:
            presets[size] = available[size]
    if spec.model_sizes is not None and spec.pretrain and presets:
        limit = min(p.max_position_embeddings for p in presets.values())
        if spec.pretrain.seq_len > limit:
            names = ", ".join(n for n, p in presets.items() if p.max_position_embeddings == limit)
            err(("pretrain", "seq_len"), spec.pretrain.seq_len, f"<= {limit} (max_position_embeddings of {names})",
                problem="longer than the model takes")
    if presets:  # finetuning the pretrained models: their position embeddings bound the input too
        limit = min(p.max_position_embeddings for p in presets.values())
        if spec.finetune.max_seq_len > limit:
            names = ", ".join(n for n, p in presets.items() if p.max_position_embeddings == limit)
            err(("finetune", "max_seq_len"), spec.finetune.max_seq_len,
                f"<= {limit} (max_position_embeddings of {names})", problem="longer than the model takes")
    return presets


def _check_data_volumes(spec: StudySpec, err: _Problems) -> tuple[DataVolume, ...]:
    """The volumes, smallest first: all of one kind, none larger than a declared corpus size."""
    if spec.data_volumes is None:
        return ()
    volumes: tuple[DataVolume, ...] = ()
    if len({v.fraction is None for v in spec.data_volumes}) > 1:
        err(("data_volumes",), [v.label for v in spec.data_volumes],
            "all fractions/percentages, or all token counts", problem="mixes fractions and token counts")
    else:
        volumes = tuple(sorted(spec.data_volumes, key=lambda v: v.fraction or v.tokens))
    total = spec.corpus.total_tokens if spec.corpus else None
    for i, v in enumerate(spec.data_volumes):
        if v.tokens is not None and total is not None and v.tokens > total:
            err(("data_volumes", i), v.label, f"<= corpus.total_tokens ({total:.3g})",
                problem="more tokens than the corpus has")
    return volumes


def _check_storage(spec: StudySpec, err: _Problems) -> None:
    from scaling_study.storage import SCHEMES, check_root

    problem = check_root(expand_env(spec.storage.root))
    if problem:
        err(("storage", "root"), spec.storage.root, "a local folder or a URI of scheme "
            + ", ".join(f"{s}://" for s in SCHEMES), problem=problem)


def _check_tracking(spec: StudySpec, err: _Problems) -> None:
    """A tracking URI MLflow can use (checked where `${VAR}` leaves none unexpanded: it may expand elsewhere)."""
    from scaling_study.tracking import URI_ALLOWED, redact_uri, uri_problem

    uri = expand_env(spec.tracking.uri) if spec.tracking.uri else None
    problem = uri_problem(uri) if uri and "${" not in uri else None
    if problem:
        err(("tracking", "uri"), redact_uri(spec.tracking.uri), f"{URI_ALLOWED}, or null for a local server",
            problem=problem)


_DOWNLOADED = ("http", "https", "ftp", "file")  # what urllib fetches


def _check_corpus(spec: StudySpec, err: _Problems) -> None:
    """Sources to read: some, each path's URI scheme read in place or downloaded, each URL's downloadable."""
    from scaling_study.storage import SCHEMES  # read in place through pyarrow.fs (scaling_study.sources)

    corpus = spec.corpus
    if corpus is None:
        return
    if not corpus.paths and not corpus.urls:
        err(("corpus",), problem="no sources", allowed="corpus.paths (local files/folders) and/or corpus.urls")
    for key, known, allowed in (
            ("paths", SCHEMES + _DOWNLOADED, "a local path, or a URI s3://bucket/key, gs://bucket/key, "
             "file:///abs/path (read in place), or an https:// URL (downloaded)"),
            ("urls", _DOWNLOADED, "an https://, http://, ftp:// or file:// URL; object-store URIs (s3://, gs://) "
             "go under corpus.paths, read in place")):
        for i, source in enumerate(getattr(corpus, key)):
            scheme = source.split("://", 1)[0].lower() if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", source) else None
            if scheme is not None and scheme not in known:
                err(("corpus", key, i), source, allowed, problem=f"unsupported URI scheme {scheme!r}")


def _check_pretrain(spec: StudySpec, err: _Problems) -> None:
    """What spans fields: the batch splits over workers, wsd's phases fit, fsdp has workers to shard over."""
    p = spec.pretrain
    if p is None:
        return
    if p.batch_size % (p.num_workers * p.grad_accum):
        err(("pretrain", "batch_size"), p.batch_size,
            f"a multiple of num_workers x grad_accum = {p.num_workers * p.grad_accum}",
            problem="does not split evenly over workers and accumulation steps")
    if p.schedule == "wsd" and p.warmup_fraction + p.decay_fraction > 1:
        err(("pretrain", "decay_fraction"), p.decay_fraction, f"<= 1 - warmup_fraction = {1 - p.warmup_fraction:g}",
            problem="warmup and decay overlap")
    if p.strategy == "fsdp" and p.num_workers < 2:
        err(("pretrain", "strategy"), p.strategy, "ddp with one worker, or num_workers >= 2",
            problem="fsdp shards across workers")


def _check_seeds(spec: StudySpec, err: _Problems) -> None:
    rule = spec.finetune.adaptive
    if rule is not None and rule.max <= rule.min:
        err(("finetune", "seeds", "adaptive", "max"), rule.max, f"more than min ({rule.min})",
            problem="no seed left to decide")


def _check_external_models(spec: StudySpec, presets: dict, err: _Problems) -> None:
    """Each external model once, under a name no other model or model size has."""
    seen_names: dict[str, int] = {}
    seen_sources: dict[tuple, int] = {}
    for i, model in enumerate(spec.external_models):
        if model.name in seen_names or model.name in presets:
            err(("external_models", i, "name"), model.name, "a name not used by another model or model size",
                problem="duplicate model name")
        if (model.source, model.revision) in seen_sources:
            err(("external_models", i, "source"), model.source, "each source (and revision) once",
                problem=f"same model as external_models[{seen_sources[(model.source, model.revision)]}]")
        seen_names.setdefault(model.name, i)
        seen_sources.setdefault((model.source, model.revision), i)


def _check_tasks(spec: StudySpec, base_dir: Path, err: _Problems) -> dict:
    """The included tasks (id -> tasks.registry.TaskInfo, sorted by id), from the registry and its extra folders."""
    from scaling_study.tasks.registry import discover, resolve_names

    registry_dirs = [resolve_path(p, base_dir) for p in spec.tasks.registry_paths]
    for i, d in enumerate(registry_dirs):
        if not d.is_dir():
            err(("tasks", "registry_paths", i), spec.tasks.registry_paths[i], "an existing folder of task folders",
                problem="not a folder")
    registry = discover([d for d in registry_dirs if d.is_dir()])
    task_ids, unknown = resolve_names(spec.tasks.include, registry)
    for name in unknown:
        err(("tasks", "include", spec.tasks.include.index(name)), name,
            f"a task id or suite: {registry.describe_names()}", problem="unknown task or suite")
    tasks = {tid: registry.tasks[tid] for tid in sorted(task_ids)}
    for tid in spec.tasks.per_task:
        if tid not in tasks:
            err(("tasks", "per_task", tid), tid, f"one of the included tasks: {', '.join(tasks) or '(none)'}",
                problem="caps for a task the study does not include")
    return tasks


def _task_caps(spec: StudySpec, tasks: dict) -> dict:
    """Per task: its own caps where `per_task` sets them, else the section's."""
    caps = {}
    for tid in tasks:
        own = spec.tasks.per_task.get(tid, TaskCaps())
        caps[tid] = TaskCaps(**{f.name: getattr(own, f.name) if getattr(own, f.name) is not None
                                else getattr(spec.tasks, f.name) for f in dataclasses.fields(TaskCaps)})
    return caps


def _doc(cls: type, name: str) -> str:
    for klass in cls.__mro__:  # an inherited field keeps its docstring on the base class only
        info = getattr(klass, "__pydantic_fields__", {}).get(name)
        if info is not None and info.description:
            return " ".join(info.description.split())
    return ""


def _type_name(tp: Any) -> str:
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return "volume" if args[0] is Any else _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if args:  # a union
        return " | ".join(_type_name(a) for a in args)
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _nested_dataclass(tp: Any) -> tuple[type | None, str]:
    """The spec dataclass a field holds (directly, optionally, or as list items / dict values)."""
    import typing

    for t in unwrap_type(tp):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t, ""
        origin = typing.get_origin(t)
        if origin in (list, dict):
            for inner in unwrap_type(typing.get_args(t)[-1]):
                if isinstance(inner, type) and dataclasses.is_dataclass(inner):
                    return inner, "[]" if origin is list else ".<name>"
    return None, ""


def spec_reference(cls: type = StudySpec, prefix: str = "") -> list[dict]:
    """Every spec field, depth first: path, type, default and its documentation (for docs/spec.md)."""
    import typing

    rows = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = f"{prefix}{f.name}"
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            made = f.default_factory()
            default = repr(made) if not dataclasses.is_dataclass(made) else "(defaults)"
        else:
            default = "required"
        rows.append({"field": path, "type": _type_name(hints[f.name]), "default": default, "doc": _doc(cls, f.name)})
        sub, suffix = _nested_dataclass(hints[f.name])
        if sub is not None:
            rows += spec_reference(sub, path + suffix + ".")
    return rows


def spec_reference_markdown() -> str:
    lines = ["# Study spec reference", "",
             "Generated from the dataclasses in `scaling_study/spec.py` by `scaling-study spec-reference`;",
             "a test keeps it current. Each field's documentation is its docstring there.", "",
             "| field | type | default | meaning |", "|---|---|---|---|"]
    for row in spec_reference():
        cells = [f"`{row['field']}`", f"`{row['type']}`", f"`{row['default']}`", row["doc"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
