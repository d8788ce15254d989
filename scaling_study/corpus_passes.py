"""The passes of a corpus build over its pieces, run in parallel with Ray Data (or here, without Ray).

    from scaling_study.corpus_passes import Reading, map_pieces, scan_piece
    reading = Reading(fmt="text", text_field="text", seed=0)
    for result in map_pieces(scan_piece, pieces, {"reading": reading}, label="scan"):
        ...                                       # one result per piece, in piece order

Every pass reads the corpus piece by piece (`scaling_study.sources`: a piece is about 64 MB of
one file) and gives each document its key, `document_key(seed, text)`: a 64-bit hash of the seed
and the document's bytes, so that a document is drawn or not whatever the piece or the worker it
falls in. A pass is a function of one piece and small arguments (thresholds, tokenizers as JSON)
that returns a small Python value (histograms, counts) or a piece's packed rows.

`map_pieces` runs a pass. In a Ray worker or a connected driver it is a Ray Data pipeline over
the pieces (`from_items(...).map_batches(..., batch_size=1, num_cpus=1)`), one task per piece on
any CPU of the cluster, its results streamed back in piece order (`preserve_order`): so the build
scales with the cluster's CPUs, and what it writes does not depend on how many run or where.
Without Ray, or for a corpus of one piece (nothing to spread: a micro corpus, or one compressed
file), it runs the same functions one piece after the other in this process. Results travel
pickled in a binary column: Ray Data moves bytes; the build's values are numpy arrays and ints.

Keys are grouped into `BUCKETS` equal ranges by their top 16 bits (`bucket`): a pass returns
per-bucket sums, and the build finds where a key prefix reaches a budget by adding them up, with
no global sort; only the one bucket where the budget falls is looked at document by document.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from scaling_study.sources import Piece, document_batches

BUCKET_BITS = 16
BUCKETS = 1 << BUCKET_BITS
"""Key ranges of the histograms: each holds 1/65,536 of the corpus (15 MB of a 1 TB corpus)."""
KEY_SPACE = 1 << 64


def document_key(seed: int, text: str) -> int:
    """The 64-bit selection key of a document: divide by 2**64 for a uniform number in [0, 1)."""
    return _key(seed, text.encode("utf-8", "surrogatepass"))


def _key(seed: int, data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b"%d:" % seed + data, digest_size=8).digest(), "little")


def bucket_edge(bucket: int) -> int:
    """The smallest key above bucket `bucket` (the exclusive upper edge of its range)."""
    return (bucket + 1) << (64 - BUCKET_BITS)


def below(keys: np.ndarray, limit: int) -> np.ndarray:
    """keys < limit, for a limit up to 2**64 (which numpy's uint64 cannot hold)."""
    if limit >= KEY_SPACE:
        return np.ones(len(keys), dtype=bool)
    return keys < np.uint64(limit)


@dataclasses.dataclass(frozen=True)
class Reading:
    """How a build reads its pieces: the corpus's format and text field, and the keys' seed."""

    fmt: str
    text_field: str
    seed: int


def keyed_batches(piece: Piece, reading: Reading) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
    """The piece's documents in file order, in batches: (keys as uint64, texts, UTF-8 sizes as int64)."""
    seed = reading.seed
    for texts in document_batches(piece, reading.fmt, reading.text_field):
        encoded = [t.encode("utf-8", "surrogatepass") for t in texts]  # once: for the key and the size
        yield (np.fromiter((_key(seed, b) for b in encoded), np.uint64, len(texts)), texts,
               np.fromiter(map(len, encoded), np.int64, len(texts)))


def _buckets(keys: np.ndarray) -> np.ndarray:
    return (keys >> np.uint64(64 - BUCKET_BITS)).astype(np.int64)


def _hist(keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.bincount(_buckets(keys), weights=weights, minlength=BUCKETS).astype(np.int64)


def _tokenizers(specs: list[str]) -> list:
    from tokenizers import Tokenizer

    # one task per CPU: the Rust tokenizer's own threads would only compete with the other tasks
    os.environ["TOKENIZERS_PARALLELISM"] = os.environ.get("SCALING_STUDY_TOKENIZER_THREADS", "false")
    return [Tokenizer.from_str(spec) for spec in specs]


def _lengths(tok, texts: list[str]) -> np.ndarray:
    return np.fromiter((len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False)), np.int64,
                       len(texts))


# ----------------------------------------------------------------------------------- the passes


def scan_piece(piece: Piece, reading: Reading, counter: str | None = None) -> dict:
    """Documents and UTF-8 bytes of the piece, and its per-bucket bytes; with `counter` (a pre-token
    counter's JSON), also per-bucket BERT pre-tokens + 1 per document."""
    hist_bytes = np.zeros(BUCKETS, dtype=np.int64)
    hist_pre = np.zeros(BUCKETS, dtype=np.int64) if counter else None
    tok = _tokenizers([counter])[0] if counter else None
    docs = 0
    for keys, texts, sizes in keyed_batches(piece, reading):
        hist_bytes += _hist(keys, sizes)
        if tok is not None:
            hist_pre += _hist(keys, _lengths(tok, texts) + 1)
        docs += len(texts)
    return {"documents": docs, "bytes": int(hist_bytes.sum()), "hist_bytes": hist_bytes, "hist_pre_tokens": hist_pre}


def sample_piece(piece: Piece, reading: Reading, limit: int) -> tuple[np.ndarray, list[str]]:
    """The piece's documents with keys below `limit`: (keys, texts), in file order."""
    all_keys, all_texts = [], []
    for keys, texts, _ in keyed_batches(piece, reading):
        kept = below(keys, limit)
        all_keys.append(keys[kept])
        all_texts.extend(itertools.compress(texts, kept))
    return (np.concatenate(all_keys) if all_keys else np.empty(0, np.uint64)), all_texts


def count_piece(piece: Piece, reading: Reading, tokenizers: list[str], limits: list[int]) -> list[np.ndarray]:
    """Per volume: per-bucket tokens (+1 [SEP] per document) of the documents with keys below its limit."""
    toks = _tokenizers(tokenizers)
    hists = [np.zeros(BUCKETS, dtype=np.int64) for _ in toks]
    for keys, texts, _ in keyed_batches(piece, reading):
        for tok, limit, hist in zip(toks, limits, hists):
            kept = below(keys, limit)
            if kept.any():
                hist += _hist(keys[kept], _lengths(tok, list(itertools.compress(texts, kept))) + 1)
    return hists


def boundary_piece(piece: Piece, reading: Reading, tokenizers: list[str], buckets: list[int]
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per volume: (keys, tokens + 1) of the documents in its boundary bucket."""
    toks = _tokenizers(tokenizers)
    out: list[tuple[list, list]] = [([], []) for _ in toks]
    for keys, texts, _ in keyed_batches(piece, reading):
        bucket_of = _buckets(keys)
        for tok, b, (k_out, n_out) in zip(toks, buckets, out):
            kept = bucket_of == b
            if kept.any():
                k_out.append(keys[kept])
                n_out.append(_lengths(tok, list(itertools.compress(texts, kept))) + 1)
    return [(np.concatenate(k) if k else np.empty(0, np.uint64), np.concatenate(n) if n else np.empty(0, np.int64))
            for k, n in out]


@dataclasses.dataclass
class Packed:
    """A piece's rows for one volume: [CLS] + seq_len-1 ids of its stream, and the accounting."""

    rows: np.ndarray  # (sequences, seq_len) int32
    documents: int = 0
    tokens: int = 0  # stream tokens: WordPiece tokens + one [SEP] per document
    dropped: int = 0  # the stream's incomplete tail, not written


def pack_piece(piece: Piece, reading: Reading, tokenizers: list[str], limits: list[int], seq_len: int,
               cls_id: list[int], sep_id: list[int], starts: list[int] | None = None) -> list[Packed]:
    """Per volume: the piece's documents with keys below its limit, tokenized and packed in file order.
    A volume whose `starts` is past this piece (a resumed build: its shards hold it already) gets nothing."""
    toks = _tokenizers(tokenizers)
    streams: list[list[np.ndarray]] = [[] for _ in toks]
    counts = [0] * len(toks)
    starts = starts or [0] * len(toks)
    for keys, texts, _ in keyed_batches(piece, reading):
        for v, (tok, limit) in enumerate(zip(toks, limits)):
            if piece.index < starts[v]:
                continue
            kept = list(itertools.compress(texts, below(keys, limit)))
            if kept:
                ids = [e.ids for e in tok.encode_batch_fast(kept, add_special_tokens=False)]
                n = sum(map(len, ids)) + len(ids)
                sep = (sep_id[v],)
                streams[v].append(np.fromiter(itertools.chain.from_iterable(itertools.chain(i, sep) for i in ids),
                                              np.int32, n))
                counts[v] += len(kept)
    return [_pack(streams[v], counts[v], seq_len, cls_id[v]) for v in range(len(toks))]


def _pack(parts: list[np.ndarray], documents: int, seq_len: int, cls_id: int) -> Packed:
    stream = np.concatenate(parts) if parts else np.empty(0, np.int32)
    body = seq_len - 1
    rows = len(stream) // body
    packed = np.empty((rows, seq_len), dtype=np.int32)
    packed[:, 0] = cls_id
    packed[:, 1:] = stream[:rows * body].reshape(rows, body)
    return Packed(packed, documents, len(stream), len(stream) - rows * body)


# ----------------------------------------------------------------------------------- running a pass


def _run_one(batch: dict, fn: Callable, pieces: list[Piece], kwargs: dict) -> dict:
    i = int(batch["piece"][0])
    return {"piece": np.array([i]), "result": np.array([pickle.dumps(fn(pieces[i], **kwargs), protocol=5)],
                                                        dtype=object)}


def map_pieces(fn: Callable, pieces: list[Piece], kwargs: dict, *, label: str,
               on_result: Callable[[int, Any], None] | None = None) -> Iterator[Any]:
    """`fn(piece, **kwargs)` for every piece, yielded in piece order (see the module docstring);
    `on_result(i, result)` is called as each arrives (progress)."""
    import ray

    if not ray.is_initialized() or len(pieces) == 1:  # one piece: nothing to spread, no pipeline to start
        for i, piece in enumerate(pieces):
            result = fn(piece, **kwargs)
            if on_result:
                on_result(i, result)
            yield result
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, False
    try:
        ds = ray.data.from_items([{"piece": i} for i in range(len(pieces))], override_num_blocks=len(pieces))
        ds = ds.map_batches(_run_one, batch_size=1, num_cpus=1, fn_kwargs={"fn": fn, "pieces": pieces,
                                                                            "kwargs": kwargs})
        expected = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, blob in zip(batch["piece"], batch["result"]):
                if int(i) != expected:
                    raise RuntimeError(f"{label}: piece {int(i)} arrived where piece {expected} was due")
                result = pickle.loads(blob)
                if on_result:
                    on_result(expected, result)
                expected += 1
                yield result
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
