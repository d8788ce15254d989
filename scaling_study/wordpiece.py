"""WordPiece tokenizers of corpus builds: trained on a sample, saved as a transformers folder.

    from scaling_study.wordpiece import train_wordpiece, save_tokenizer, load_tokenizer
    tok = train_wordpiece(batches_of_texts, chars, vocab_size=30522, cased=True, min_frequency=2)
    special = save_tokenizer(tok, out_dir / "tokenizer")     # {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    tok = load_tokenizer(out_dir)                            # AutoTokenizer, adds [CLS] ... [SEP]

BERT's normalizer (cased or not) and pre-tokenizer, a WordPiece model with `##` continuations.
Training is deterministic: every `##c` continuation of the sample's characters is registered
before training (`continuation_tokens`), so the same texts in the same order give a
byte-identical tokenizer.json. `PAIR_COUNT_LIMIT` is the most characters a sample may hold: the
`tokenizers` trainer keeps pair counts in 32-bit integers (`count_pairs` adds `counts[i] as i32`),
and a pair's count is at most the number of characters, so a smaller sample cannot wrap them.
"""

from __future__ import annotations

import contextlib
import json
import os
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

from scaling_study.errors import UserError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""In id order: the trainer gives them ids 0-4."""
PAIR_COUNT_LIMIT = 2**31 - 1
"""Most characters a tokenizer sample may hold (the trainer's pair counters are 32-bit)."""


def load_tokenizer(out_dir: Path | str):
    """A build's tokenizer via `AutoTokenizer` (cased as built; adds [CLS] ... [SEP])."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(out_dir) / "tokenizer"))


def train_wordpiece(batches: Iterable[list[str]], chars: set[str], *, vocab_size: int, cased: bool,
                    min_frequency: int):
    """The WordPiece tokenizer trained on `batches` of texts whose characters are `chars`; with the
    [CLS] ... [SEP] template. Raises UserError when `vocab_size` is below the sample's alphabet."""
    from tokenizers import trainers

    tok = new_tokenizer(cased)
    continuations = continuation_tokens(chars, cased)
    _check_vocab_size(vocab_size, tok, chars, continuations)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS) + continuations,
        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(iter(batches), trainer)
    return _finish_tokenizer(tok)


def new_tokenizer(cased: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=not cased)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def pre_token_counter(cased: bool):
    """Counts BERT pre-tokens: a word-level model that maps every pre-token to [UNK]."""
    from tokenizers import Tokenizer, models

    counter = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    template = new_tokenizer(cased)
    counter.normalizer, counter.pre_tokenizer = template.normalizer, template.pre_tokenizer
    return counter


def _is_punctuation(char: str) -> bool:
    """BertPreTokenizer's split characters besides whitespace (so never inside a word)."""
    code = ord(char)
    return (33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126
            or unicodedata.category(char).startswith("P"))


def continuation_tokens(chars: set[str], cased: bool) -> list[str]:
    """`##c` for every character that can continue a word, in a fixed order.

    The trainer creates these lazily while iterating a hash map, so their ids, and through merge
    tie-breaking even the vocabulary, differ from run to run (huggingface/tokenizers#1794).
    Registering them up front, as trainer special tokens, makes training deterministic.
    """
    normalizer = new_tokenizer(cased).normalizer
    found = {d for c in chars for d in normalizer.normalize_str(c) if not d.isspace() and not _is_punctuation(d)}
    if "σ" in found:
        found.add("ς")  # lowercasing picks the final sigma by context
    return [f"##{c}" for c in sorted(found)]


def _check_vocab_size(vocab_size: int, tok, chars: set[str], continuations: list[str]) -> None:
    """WordPiece keeps the whole alphabet whatever `vocab_size` says: a smaller one would build a
    larger vocabulary than the spec (and `plan`) counts, so it is refused."""
    alphabet = {d for c in chars for d in tok.normalizer.normalize_str(c) if not d.isspace()}
    need = len(SPECIAL_TOKENS) + len(alphabet) + len(continuations)
    if vocab_size < need:
        raise UserError(f"corpus.vocab_size {vocab_size:,} is smaller than this corpus's alphabet: {need:,} tokens "
                        f"({len(SPECIAL_TOKENS)} special, {len(alphabet):,} characters, {len(continuations):,} "
                        f"## continuations); allowed: corpus.vocab_size >= {need:,}")


def _finish_tokenizer(tok):
    """Drop the `##c` registrations from the added tokens (they stay in the vocabulary) and add the
    [CLS] ... [SEP] template; returns the tokenizer as it will be saved."""
    from tokenizers import Tokenizer, processors

    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    tok = Tokenizer.from_str(json.dumps(data))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    # Without a post-processor `tok(text)` adds no [CLS]/[SEP] (REFERENCE.md).
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tok


def save_tokenizer(tok, folder: Path) -> dict[str, int]:
    """Save as a transformers folder and check it loads back as built; returns the special ids."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    # PreTrainedTokenizerFast keeps tokenizer.json as is; BertTokenizerFast would record
    # do_lower_case=True and lowercase a cased vocabulary on load.
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(str(folder))
    loaded = AutoTokenizer.from_pretrained(str(folder))
    probe = loaded("a b")["input_ids"]
    if len(loaded) != tok.get_vocab_size() or probe[0] != ids["[CLS]"] or probe[-1] != ids["[SEP]"]:
        raise RuntimeError(f"saved tokenizer does not load back as built: {len(loaded)} ids, 'a b' -> {probe}")
    return {name.strip("[]").lower(): i for name, i in ids.items()}


@contextlib.contextmanager
def tokenizers_parallelism(enabled: bool) -> Iterator[None]:
    """Let the Rust tokenizer use all cores during the build (the package turns it off by default
    so that forking workers later does not warn); restored afterwards."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
