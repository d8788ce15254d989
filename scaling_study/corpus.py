"""Corpus builds: one per data volume (the `corpus` nodes of `grid.expand`).

    from scaling_study.corpus import build_corpus, check_corpus, load_tokenizer
    from scaling_study.artifacts import CorpusBuild
    check_corpus(study)                                           # bad files raise UserError before any work
    for node in plan.of_kind("corpus"):
        manifest = build_corpus(study, node, root / node.id)     # a no-op once built
    tok = load_tokenizer(root / node.id)                          # AutoTokenizer, adds [CLS] ... [SEP]
    files = CorpusBuild.open(root / node.id).shard_paths          # Parquet, one column `input_ids`

A build reads the corpus (plain UTF-8, one document per line; blank lines are skipped), keeps a
nested, seeded subset of its documents, trains a WordPiece tokenizer on that subset, and packs the
subset into sequences of exactly `seq_len` token ids, written as Parquet shards:

    <out_dir>/manifest.json            written last; its presence means the build is complete
    <out_dir>/tokenizer/               `AutoTokenizer.from_pretrained` folder (tokenizer.json, config)
    <out_dir>/shards/shard-00000.parquet  column `input_ids`: fixed_size_list<int32>[seq_len]

Subsets. Document i (counting non-blank lines over the sources in their node order, folders as
their sorted `*.txt` files) gets the key `blake2b("<seed>:<i>")` read as a 64-bit integer, i.e. a
uniform number in [0, 1). A fraction f keeps the documents with key < f, so the 1% subset lies
inside the 10% one by construction and nothing is shuffled. A token count keeps the documents
with the smallest keys until their `tokens` (below) reach the budget: a prefix in key order, so
token-count volumes nest too. Its tokenizer is trained on the smallest key-order prefix whose BERT
pre-tokens (words and punctuation) reach the budget: every pre-token becomes at least one
WordPiece, so that prefix contains the packed documents (it is larger by the tokens-per-pre-token
ratio: 1.22 on the 60 MB science corpus with an 8k vocabulary).

Passes over the files: a fraction reads them three times (characters, tokenizer training,
tokenize-and-pack), a token count five times (pre-token count and token count besides). Training is
deterministic: the same inputs give a byte-identical tokenizer.json and identical shards.

Packing. Every sequence is `[CLS]` followed by `seq_len - 1` ids of the token stream; the stream is
the documents in corpus order, each followed by `[SEP]`; a document that does not fit continues
in the next sequence (after that sequence's `[CLS]`). The incomplete tail is dropped. Accounting:
`tokens` = WordPiece tokens of the documents + one `[SEP]` per document (the stream), and
`tokens == sequences * (seq_len - 1) + dropped_tokens` always holds; the `[CLS]` ids are extra.
Shards hold sequences in corpus order, not shuffled: the pretraining loader shuffles.

A build is written into a hidden sibling folder and renamed into place at the end, so a killed
build leaves only that folder behind (removed by the next build on the same host) and never a
folder that looks finished. Memory is flat in the corpus size: documents are streamed, and only a
token-count volume keeps 16 bytes per candidate document (key and count) to sort by key.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import time
import unicodedata
import urllib.parse
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from scaling_study.artifacts import Manifest, read_manifest
from scaling_study.downloads import ENV_OFFLINE, DownloadError, fetch
from scaling_study.errors import SpecError, UserError, file_problem
from scaling_study.grid import Node
from scaling_study.spec import DataVolume, Study, expand_env
from scaling_study.storage import replace_dir

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""In id order: the trainer gives them ids 0-4."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BATCH_DOCS = 1024
_BATCH_CHARS = 1 << 20  # bounds a batch's text when documents are long
_ROW_GROUP_BYTES = 4 << 20
MAX_DOCUMENT_BYTES = 16 << 20
"""Longest document (line) a corpus file may hold: 16 MiB, 100x the longest full-text paper of the
science corpus (142 kB). A longer line is refused with its file and line number rather than read
whole into memory: it is a file without newlines, or not text."""
BINARY_SNIFF_BYTES = 8000
"""A NUL byte among a file's first 8,000 bytes makes it binary (as git decides). NULs further in are
kept: real text has them (74 in one file of the science corpus); the tokenizer drops them."""
PREFLIGHT_SCAN_BYTES = 256 << 20
"""How much of the corpus `check_corpus` reads before a run starts (see there)."""


# ----------------------------------------------------------------------------------- the build's tokenizer


def load_tokenizer(out_dir: Path | str):
    """The build's tokenizer via `AutoTokenizer` (cased as built; adds [CLS] ... [SEP])."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(out_dir) / "tokenizer"))


# ----------------------------------------------------------------------------------- input files


def _is_url(source: str) -> bool:
    return bool(_URL.match(source))


def _source_field(study: Study, source: str) -> str:
    corpus = study.spec.corpus
    for key, values in (("paths", corpus.paths if corpus else []), ("urls", corpus.urls if corpus else [])):
        if source in values:
            return f"corpus.{key}[{values.index(source)}]"
    return "corpus.urls" if _is_url(source) else "corpus.paths"


def _cached_name(url: str) -> str:
    base = Path(urllib.parse.urlparse(url).path).name or "corpus.txt"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-80:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


def _download(url: str, dest: Path, study: Study) -> None:
    """Fetch `url` into `dest` once (scaling_study.downloads: atomic, refused offline)."""
    try:
        fetch(url, dest)
    except DownloadError as exc:
        yourself = "download it yourself and list it under corpus.paths"
        if exc.offline:
            allowed, problem = f"unset {ENV_OFFLINE}, or {yourself}", exc.reason
        else:
            allowed, problem = f"a reachable URL of a UTF-8 text file, or {yourself}", f"cannot download ({exc.reason})"
        raise SpecError(study.file, _source_field(study, url), url, allowed, problem=problem) from None


def _resolve_sources(study: Study, sources: list[str], cache_dir: Path, download: bool) -> list[Path]:
    files: list[Path] = []
    for source in sources:
        if _is_url(source):
            dest = cache_dir / _cached_name(source)
            if download:
                _download(source, dest, study)
            files.append(dest)
            continue
        path = study.resolve_path(source)
        problem = file_problem(path)
        if problem == "a folder":
            found = sorted(p for p in path.glob("*.txt") if not p.is_dir())
            for p in found:  # a FIFO or a device named *.txt would block the build or never end
                if file_problem(p):
                    raise SpecError(study.file, _source_field(study, source), source, "regular *.txt files",
                                    problem=_not_regular(p, file_problem(p)))
            if not found:
                raise SpecError(study.file, _source_field(study, source), source,
                                "a text file, or a folder holding *.txt files",
                                problem=f"folder {path} holds no *.txt file")
            files.extend(found)
        elif problem is None:
            files.append(path)
        elif problem == "no such file":
            raise SpecError(study.file, _source_field(study, source), source,
                            "an existing text file or folder of *.txt files (relative paths resolve "
                            "against the spec's folder; ${VAR:-default} expands)",
                            problem=f"no such file or folder: {path}")
        else:
            raise SpecError(study.file, _source_field(study, source), source,
                            "a regular text file, or a folder of *.txt files", problem=_not_regular(path, problem))
    return files


def _not_regular(path: Path, problem: str) -> str:
    return f"{path} is {problem}" if problem.startswith("a ") else f"{path}: {problem}"


def corpus_files(study: Study, *, cache_dir: Path | str | None = None, download: bool = False) -> list[Path]:
    """The corpus's input files in reading order: paths (folders as their sorted *.txt), then URLs.

    URLs map to their file in `cache_dir` (default `<storage.root>/cache`), fetched if `download`.
    Raises `UserError` for a missing path or a folder without *.txt files.
    """
    corpus = study.spec.corpus
    if corpus is None:
        return []
    if cache_dir is None:
        from scaling_study.storage import Store

        cache_dir = Store(expand_env(study.spec.storage.root)).local / "cache"  # a URI root: its local mirror
    return _resolve_sources(study, sorted(corpus.paths) + sorted(corpus.urls), Path(cache_dir), download)


# ----------------------------------------------------------------------------------- documents


def document_key(seed: int, index: int) -> int:
    """The 64-bit selection key of document `index`: divide by 2**64 for a uniform number in [0, 1)."""
    return int.from_bytes(hashlib.blake2b(b"%d:%d" % (seed, index), digest_size=8).digest(), "little")


class _Reader:
    """Streams the documents of the input files: (index, key, text), blank lines skipped."""

    def __init__(self, files: list[Path], seed: int):
        self.files, self.seed = files, seed
        self.bytes_read = 0
        self.documents = 0

    def __iter__(self) -> Iterator[tuple[int, int, str]]:
        index = 0
        for path in self.files:
            _check_not_binary(path)
            with _open(path) as f:
                # readline(limit) bounds memory: a file without newlines is refused, not slurped
                for lineno, raw in enumerate(iter(lambda: f.readline(MAX_DOCUMENT_BYTES + 2), b""), 1):
                    self.bytes_read += len(raw)
                    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]
                    if not raw.strip():
                        continue
                    text = _document(raw, path, lineno)
                    yield index, document_key(self.seed, index), text
                    index += 1
                    self.documents = index


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as exc:  # unreadable, or gone since the sources were resolved
        raise UserError(f"{path}: cannot read the corpus file ({exc.strerror or exc}); allowed: a readable "
                        f"UTF-8 text file, one document per line") from None


def _check_not_binary(path: Path) -> None:
    """A NUL byte in the first BINARY_SNIFF_BYTES: a binary file or UTF-16 text (git's test for binary)."""
    with _open(path) as f:
        head = f.read(BINARY_SNIFF_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        line = head.count(b"\n", 0, nul) + 1
        raise UserError(f"{path}:{line}: a NUL byte at byte {nul + 1} of the file: a binary "
                        f"file, or UTF-16 text; allowed: UTF-8 text, one document per line")


def _document(raw: bytes, path: Path, lineno: int) -> str:
    """One line of a corpus file as text; raises UserError naming the file and line."""
    allowed = "UTF-8 text, one document per line"
    if len(raw.rstrip(b"\r\n")) > MAX_DOCUMENT_BYTES:
        raise UserError(f"{path}:{lineno}: a line longer than {MAX_DOCUMENT_BYTES:,} bytes; allowed: {allowed}, "
                        f"each at most {MAX_DOCUMENT_BYTES:,} bytes (MAX_DOCUMENT_BYTES)")
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
                        f"of the line); allowed: {allowed}") from None


def check_corpus(study: Study, *, scan_bytes: int = PREFLIGHT_SCAN_BYTES) -> list[Path]:
    """Refuse a bad corpus before anything runs; returns its local files (URLs are not fetched here).

    Every path must exist and be readable; a folder must hold *.txt files; no file may look binary
    (BINARY_SNIFF_BYTES). The first `scan_bytes` of the local files (in reading order, 256 MiB by
    default: a second or two) are read as the build reads them: bytes that are not UTF-8 or a line
    over MAX_DOCUMENT_BYTES raise a UserError naming the file and line, and so does a corpus whose
    files hold no document at all. A problem beyond the scanned bytes stops the build itself with the
    same message.
    """
    corpus = study.spec.corpus
    if corpus is None:
        return []
    local = [source for source in sorted(corpus.paths) if not _is_url(source)]
    files = _resolve_sources(study, local, Path("."), download=False)
    budget, documents, complete = scan_bytes, 0, True
    for path in files:
        if budget <= 0:
            complete = False
            break
        _check_not_binary(path)
        with _open(path) as f:
            for lineno, raw in enumerate(iter(lambda: f.readline(MAX_DOCUMENT_BYTES + 2), b""), 1):
                budget -= len(raw)
                if lineno == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")
                if raw.strip():
                    _document(raw, path, lineno)
                    documents += 1
                if budget <= 0:
                    complete = False
                    break
    if complete and files and documents == 0 and not corpus.urls:
        where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
        raise UserError(f"{where}: corpus '{corpus.name}' has no documents (every file is empty or blank); "
                        f"allowed: UTF-8 text files with one document per line")
    if complete and documents and not corpus.urls:
        _check_fractions(study, documents)
    return files


def _check_fractions(study: Study, documents: int) -> None:
    """A fraction so small that it selects none of the corpus's documents (the build draws document
    `i` when `document_key(seed, i) < fraction * 2**64`): refused before anything runs."""
    fractions = [v for v in study.volumes if v.fraction is not None]
    if not fractions:
        return
    seed = study.spec.corpus.seed
    smallest = min(document_key(seed, i) for i in range(documents))
    for i, volume in enumerate(study.spec.data_volumes or []):
        if volume.fraction is not None and smallest >= int(volume.fraction * 2**64):
            raise SpecError(study.file, f"data_volumes[{i}]", volume.label,
                            f"a fraction of at least {smallest / 2**64:.2g} (the smallest that draws a document "
                            f"with corpus.seed {seed}; about 1/{documents:,})",
                            problem=f"selects none of the corpus's {documents:,} documents")


def _batches(docs: Iterator[tuple[int, int, str]], keep: Callable[[int], bool]) -> Iterator[list[tuple[int, str]]]:
    """Selected documents as (key, text), in batches bounded in count and characters."""
    batch: list[tuple[int, str]] = []
    chars = 0
    for _, key, text in docs:
        if not keep(key):
            continue
        batch.append((key, text))
        chars += len(text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _KeyPrefix:
    """The smallest-key documents whose counts reach `budget`, found in one streaming pass.

    Keeps (key, count) of candidates: 16 bytes each. When the buffer doubles, everything above the
    current cutoff is dropped, so a small budget over a huge corpus stays small.
    """

    min_buffer = 1 << 20

    def __init__(self, budget: int):
        self.budget = budget
        self.keys, self.counts = array("Q"), array("q")
        self.cutoff: int | None = None  # include keys <= cutoff
        self._prune_at = self.min_buffer

    def wants(self, key: int) -> bool:
        return self.cutoff is None or key <= self.cutoff

    def add(self, key: int, count: int) -> None:
        self.keys.append(key)
        self.counts.append(count)
        if len(self.keys) >= self._prune_at:
            self._prune()
            self._prune_at = max(self.min_buffer, 2 * len(self.keys))

    def _prune(self) -> None:
        keys = np.frombuffer(self.keys, dtype=np.uint64).copy()
        counts = np.frombuffer(self.counts, dtype=np.int64).copy()
        order = np.argsort(keys, kind="stable")
        reached = np.flatnonzero(np.cumsum(counts[order]) >= self.budget)
        if len(reached):  # the cutoff only falls as documents come: smaller keys replace larger ones
            self.cutoff = int(keys[order[reached[0]]])
            kept = keys <= np.uint64(self.cutoff)
            self.keys, self.counts = array("Q", keys[kept].tobytes()), array("q", counts[kept].tobytes())

    def result(self) -> tuple[int | None, int]:
        """(cutoff, or None if all documents fall short of the budget; sum of the kept counts)."""
        self._prune()
        return self.cutoff, int(np.frombuffer(self.counts, dtype=np.int64).sum())


# ----------------------------------------------------------------------------------- tokenizer


def _new_tokenizer(cased: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=not cased)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _pre_token_counter(cased: bool):
    """Counts BERT pre-tokens: a word-level model that maps every pre-token to [UNK]."""
    from tokenizers import Tokenizer, models

    counter = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    template = _new_tokenizer(cased)
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
    normalizer = _new_tokenizer(cased).normalizer
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


def _save_tokenizer(tok, folder: Path) -> dict[str, int]:
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
def _tokenizers_parallelism(enabled: bool) -> Iterator[None]:
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


# ----------------------------------------------------------------------------------- packing


class _ShardWriter:
    """Writes rows of exactly seq_len ids as they come, into shards of `sizes` rows each."""

    def __init__(self, folder: Path, seq_len: int, sizes: Iterator[int]):
        import pyarrow as pa

        self.folder, self.seq_len, self.sizes = folder, seq_len, sizes
        self.target = next(sizes)
        self.schema = pa.schema([("input_ids", pa.list_(pa.int32(), seq_len))])
        self.row_group = max(1, _ROW_GROUP_BYTES // (4 * seq_len))
        self.buffer = np.empty((self.row_group, seq_len), dtype=np.int32)
        self.buffered = 0  # rows in the buffer
        self.in_shard = 0  # rows already written to the open shard
        self.writer = None
        self.shards: list[dict] = []
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, rows: np.ndarray) -> None:
        while len(rows):
            room = min(self.row_group - self.buffered, self.target - self.in_shard - self.buffered)
            self.buffer[self.buffered:self.buffered + min(room, len(rows))] = rows[:room]
            self.buffered += min(room, len(rows))
            rows = rows[room:]
            if self.buffered == self.row_group or self.in_shard + self.buffered == self.target:
                self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.buffered:
            return
        if self.writer is None:
            name = f"shard-{len(self.shards):05d}.parquet"
            self.writer = pq.ParquetWriter(self.folder / name, self.schema, compression="zstd")
            self.shards.append({"file": f"shards/{name}", "sequences": 0})
        ids = pa.FixedSizeListArray.from_arrays(pa.array(self.buffer[:self.buffered].reshape(-1)), self.seq_len)
        self.writer.write_table(pa.table([ids], schema=self.schema), row_group_size=self.row_group)
        self.in_shard += self.buffered
        self.shards[-1]["sequences"] = self.in_shard
        self.buffered = 0
        if self.in_shard == self.target:
            self.writer.close()
            self.writer, self.in_shard = None, 0
            self.target = next(self.sizes, self.target)

    def close(self) -> list[dict]:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.shards


class _Packer:
    """Turns documents' ids into rows: [CLS] + seq_len-1 stream ids, [SEP] after each document."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, out: _ShardWriter):
        self.seq_len, self.body, self.cls_id, self.sep_id, self.out = seq_len, seq_len - 1, cls_id, sep_id, out
        self.carry = np.empty(0, dtype=np.int32)
        self.tokens = 0  # Python ints: no overflow however large the corpus
        self.sequences = 0

    def add(self, docs: list[list[int]]) -> None:
        n = sum(len(ids) for ids in docs) + len(docs)
        stream = np.empty(len(self.carry) + n, dtype=np.int32)
        stream[:len(self.carry)] = self.carry
        stream[len(self.carry):] = np.fromiter(
            itertools.chain.from_iterable(itertools.chain(ids, (self.sep_id,)) for ids in docs), np.int32, n)
        self.tokens += n
        rows = len(stream) // self.body
        if rows:
            packed = np.empty((rows, self.seq_len), dtype=np.int32)
            packed[:, 0] = self.cls_id
            packed[:, 1:] = stream[:rows * self.body].reshape(rows, self.body)
            self.out.write(packed)
            self.sequences += rows
        self.carry = stream[rows * self.body:].copy()


def _rebalance(folder: Path, shards: list[dict], count: int, seq_len: int) -> list[dict]:
    """Re-split a small build into `count` shards of nearly equal size (so every worker gets one)."""
    import pyarrow.parquet as pq

    total = sum(s["sequences"] for s in shards)
    new = folder.with_name(folder.name + ".rebalance")
    writer = _ShardWriter(new, seq_len, iter([total // count + (i < total % count) for i in range(count)]))
    for shard in shards:
        for batch in pq.ParquetFile(folder.parent / shard["file"]).iter_batches(batch_size=writer.row_group):
            writer.write(batch.column(0).flatten().to_numpy().reshape(-1, seq_len))
    out = writer.close()
    shutil.rmtree(folder)
    new.rename(folder)
    return out


# ----------------------------------------------------------------------------------- build


class _Passes:
    """Streams the selected documents of the corpus, once per pass, with a progress bar per pass."""

    def __init__(self, files: list[Path], seed: int, progress: bool, label: str):
        self.files, self.seed, self.progress, self.label = files, seed, progress, label
        self.total_bytes = sum(f.stat().st_size for f in files)
        self.documents = 0  # documents in the corpus, known after a full pass
        self.bar = None

    def batches(self, desc: str, keep: Callable[[int], bool]) -> Iterator[list[tuple[int, str]]]:
        from tqdm.auto import tqdm

        reader, seen, selected = _Reader(self.files, self.seed), 0, 0
        with tqdm(total=self.total_bytes, desc=f"{self.label}: {desc}", unit="B", unit_scale=True,
                  disable=not self.progress, leave=False, dynamic_ncols=True) as self.bar:
            for batch in _batches(iter(reader), keep):
                yield batch
                selected += len(batch)
                self.bar.set_postfix(documents=selected, refresh=False)
                self.bar.update(reader.bytes_read - seen)
                seen = reader.bytes_read
            self.bar.update(reader.bytes_read - seen)
        self.documents = reader.documents


def _partial_dirs(out_dir: Path) -> list[Path]:
    return sorted(out_dir.parent.glob(f".{out_dir.name}.partial-*"))


def _remove_stale_partials(out_dir: Path) -> None:
    """Remove temp folders of killed builds of this node (same host, process gone)."""
    host = socket.gethostname()
    for folder in _partial_dirs(out_dir):
        match = re.fullmatch(rf"\.{re.escape(out_dir.name)}\.partial-(.+)-(\d+)", folder.name)
        if not match or match.group(1) != host:
            continue
        try:
            os.kill(int(match.group(2)), 0)
            alive = int(match.group(2)) != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)


def build_corpus(study: Study, node: Node, out_dir: Path | str, *, progress: bool = True,
                 shard_sequences: int = 8192, min_shards: int = 16, cache_dir: Path | str | None = None,
                 parallel: bool = True) -> Manifest:
    """Build the corpus node into `out_dir` and return its manifest; a no-op if already built.

    shard_sequences: most rows per Parquet shard. min_shards: a build with fewer rows than
    `shard_sequences * min_shards` is split into `min_shards` equal shards instead (fewer only if it
    has fewer rows), so that data-parallel workers each get files. Neither changes the node id or
    the stream. cache_dir: where `corpus.urls` are downloaded (default `<out_dir>/../cache`).
    parallel: let the tokenizer use every core. Raises `UserError` for a bad corpus or volume.
    """
    if node.kind != "corpus":
        raise ValueError(f"build_corpus needs a corpus node, got {node.kind} node {node.id}")
    if shard_sequences < 1 or min_shards < 1:
        raise ValueError("shard_sequences and min_shards must be >= 1")
    out_dir = Path(out_dir)
    existing = read_manifest(out_dir)
    if existing is not None:
        if existing.node_id != node.id:
            raise UserError(f"{out_dir}: holds the build of corpus node {existing.node_id}, not {node.id}; "
                            f"allowed: one folder per node (e.g. <storage>/corpus/<node id>)")
        return existing

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _tokenizers_parallelism(parallel):
            manifest = _build(study, node, tmp, progress=progress, shard_sequences=shard_sequences,
                              min_shards=min_shards,
                              cache_dir=Path(cache_dir) if cache_dir is not None else out_dir.parent / "cache")
        if out_dir.exists():  # a folder without a valid manifest: a leftover, not a build
            if read_manifest(out_dir) is not None:  # someone else finished the same node meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                return build_corpus(study, node, out_dir, progress=progress)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _build(study: Study, node: Node, tmp: Path, *, progress: bool, shard_sequences: int, min_shards: int,
           cache_dir: Path) -> Manifest:
    start = time.monotonic()
    inputs = node.inputs
    seq_len, seed, cased = int(inputs["seq_len"]), int(inputs["seed"]), bool(inputs["cased"])
    volume = DataVolume(**inputs["volume"])
    if seq_len < 2:
        raise SpecError(study.file, "pretrain.seq_len", seq_len, "at least 2 ([CLS] and one token)",
                        problem="too short to pack")
    files = _resolve_sources(study, list(inputs["sources"]), cache_dir, download=True)
    input_files = []
    for f in files:
        st = f.stat()
        url = next((u for u in inputs["sources"] if _is_url(u) and cache_dir / _cached_name(u) == f), None)
        input_files.append({"path": str(f.resolve()), "bytes": st.st_size, "mtime": st.st_mtime}
                           | ({"url": url} if url else {}))
    where = files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
    passes = _Passes(files, seed, progress, f"{node.id} ({volume.label})")

    def check_documents() -> None:
        if passes.documents == 0:
            raise UserError(f"{where}: corpus '{inputs['name']}' has no documents (every line is blank); "
                            f"allowed: UTF-8 text files with one document per line")

    # 1. The tokenizer's documents: the subset (fractions), or a pre-token prefix containing it (tokens).
    if volume.fraction is not None:
        limit = int(volume.fraction * 2**64)
        in_training = lambda key: key < limit  # noqa: E731
    else:
        cutoff, _ = _key_prefix(passes, "count words", _pre_token_counter(cased), volume.tokens, lambda key: True)
        check_documents()
        in_training = (lambda key: True) if cutoff is None else (lambda key: key <= cutoff)  # noqa: E731

    # 2. Train the tokenizer on them, streamed.
    tok, trained = _train_tokenizer(passes, in_training, inputs)
    check_documents()
    if trained == 0:
        raise UserError(f"{where}: data volume {volume.label} selects none of the {passes.documents} documents "
                        f"(seed {seed}); allowed: a fraction of at least about {1 / passes.documents:.2g}")
    tokenizer_dir = tmp / "tokenizer"
    special = _save_tokenizer(tok, tokenizer_dir)

    # 3. The subset: the same documents (fractions), or the key-order prefix reaching the budget (tokens).
    in_subset = in_training
    if volume.tokens is not None:
        cutoff, total = _key_prefix(passes, "count tokens", tok, volume.tokens, in_training)
        if cutoff is None:
            raise UserError(f"{where}: data volume {volume.label} is more than the corpus's {total:,} tokens "
                            f"(with this tokenizer, [SEP] per document included); allowed: at most {total:,} "
                            f"tokens, or a fraction")
        in_subset = lambda key: key <= cutoff  # noqa: E731

    # 4. Tokenize and pack the subset, writing shards as rows fill.
    writer = _ShardWriter(tmp / "shards", seq_len, itertools.repeat(shard_sequences))
    packer = _Packer(seq_len, special["cls"], special["sep"], writer)
    documents = 0
    for batch in passes.batches("tokenize and pack", in_subset):
        packer.add([enc.ids for enc in tok.encode_batch([text for _, text in batch], add_special_tokens=False)])
        documents += len(batch)
        passes.bar.set_postfix(documents=documents, tokens=packer.tokens, refresh=False)
    shards = writer.close()
    if packer.sequences == 0:
        raise UserError(f"{where}: data volume {volume.label} has {packer.tokens} tokens in {documents} documents, "
                        f"less than one sequence of seq_len {seq_len}; allowed: a larger data volume or a "
                        f"shorter pretrain.seq_len")
    if len(shards) < min_shards and packer.sequences > len(shards):
        shards = _rebalance(tmp / "shards", shards, min(min_shards, packer.sequences), seq_len)

    manifest = Manifest(
        node_id=node.id, inputs=inputs, seq_len=seq_len, vocab_size=tok.get_vocab_size(), special_tokens=special,
        tokenizer_hash=hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest(),
        corpus_documents=passes.documents, tokenizer_documents=trained, documents=documents,
        tokens=packer.tokens, sequences=packer.sequences, dropped_tokens=len(packer.carry), shards=shards,
        input_files=input_files, build_seconds=round(time.monotonic() - start, 3),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    assert manifest.tokens == manifest.sequences * (seq_len - 1) + manifest.dropped_tokens
    manifest.write(tmp)
    return manifest


def _key_prefix(passes: _Passes, desc: str, tok, budget: int, keep: Callable[[int], bool]) -> tuple[int | None, int]:
    """One pass counting `tok`'s tokens (+1 for [SEP]) per kept document: the key cutoff of the
    shortest key-order prefix reaching `budget` (None if the documents fall short), and the count
    of the kept documents (all of them if short)."""
    prefix = _KeyPrefix(budget)
    for batch in passes.batches(desc, lambda key: keep(key) and prefix.wants(key)):
        encodings = tok.encode_batch([text for _, text in batch], add_special_tokens=False)
        for (key, _), enc in zip(batch, encodings):
            if prefix.wants(key):
                prefix.add(key, len(enc.ids) + 1)
    return prefix.result()


def _train_tokenizer(passes: _Passes, keep: Callable[[int], bool], inputs: dict) -> tuple[Any, int]:
    """The WordPiece tokenizer trained on the kept documents (two streaming passes), and their count."""
    from tokenizers import trainers

    cased = bool(inputs["cased"])
    chars: set[str] = set()
    for batch in passes.batches("scan characters", keep):
        for _, text in batch:
            chars.update(text)
    tok = _new_tokenizer(cased)
    continuations = continuation_tokens(chars, cased)
    _check_vocab_size(int(inputs["vocab_size"]), tok, chars, continuations)
    trainer = trainers.WordPieceTrainer(
        vocab_size=int(inputs["vocab_size"]), min_frequency=int(inputs["min_frequency"]),
        special_tokens=list(SPECIAL_TOKENS) + continuations, continuing_subword_prefix="##",
        show_progress=False)
    trained = 0

    def texts() -> Iterator[list[str]]:
        nonlocal trained
        for batch in passes.batches("train tokenizer", keep):
            trained += len(batch)
            yield [text for _, text in batch]

    tok.train_from_iterator(texts(), trainer)
    return _finish_tokenizer(tok), trained
