"""Corpus builds: every data volume of a corpus in one Ray Data build over the cluster's CPUs.

    from scaling_study.corpus import build_corpora, check_corpus
    from scaling_study.artifacts import CorpusBuild
    from scaling_study.wordpiece import load_tokenizer
    check_corpus(study)                                  # bad files raise UserError before any work
    nodes = plan.of_kind("corpus")                       # one per data volume
    manifests = build_corpora(study, nodes, [root / n.id for n in nodes])   # finished ones are kept
    tok = load_tokenizer(root / nodes[0].id)             # AutoTokenizer, adds [CLS] ... [SEP]
    files = CorpusBuild.open(root / nodes[0].id).shard_paths     # Parquet, one column `input_ids`

Inputs are the corpus's files and folders, local or on an object store (`scaling_study.sources`:
plain text one document per line, JSONL or Parquet with a text field, .gz/.zst compressed), read
in pieces of about 64 MB. Each volume's build folder holds:

    <out_dir>/manifest.json            written last; its presence means the build is complete
    <out_dir>/tokenizer/               `AutoTokenizer.from_pretrained` folder (tokenizer.json, config)
    <out_dir>/shards/shard-00000.parquet  column `input_ids`: fixed_size_list<int32>[seq_len]

Subsets. A document's key is a 64-bit hash of the seed and its bytes (`document_key`), read as a
uniform number in [0, 1): the same whatever file, piece or worker the document is in. A fraction f
keeps the documents with key < f, so the 1% subset lies inside the 10% one by construction. A
token count keeps the smallest keys until their tokens (below) reach the budget: a key prefix, so
token-count volumes nest too; its threshold is found from per-bucket sums (`corpus_passes`), not by
sorting the corpus on one node.

Tokenizers. Each volume's WordPiece tokenizer is trained on its smallest-key documents up to
`corpus.tokenizer_sample` bytes (the whole volume when smaller), so the samples nest as well; a
token-count volume's sample is taken from the key prefix whose BERT pre-tokens reach its budget
(every pre-token is at least one WordPiece, so that prefix contains the volume). A sample of more
characters than `wordpiece.PAIR_COUNT_LIMIT` is refused: the trainer's pair counts would wrap.

Passes (each a Ray Data pipeline over the pieces, `corpus_passes`), for all volumes at once:
scan (documents, bytes and pre-tokens per key bucket), sample (the tokenizers' documents; then
training, one volume after the other, in this process), for token-count volumes count and
boundary (tokens per bucket, then the boundary bucket's documents), and pack. The input is read
3 times for a study of fractions whatever its number of volumes (5 with token counts).

Packing. A piece's documents of a volume, in file order, each followed by `[SEP]`, make the
piece's stream; every row is `[CLS]` followed by `seq_len - 1` ids of it, and its incomplete tail is
dropped. Shards hold the pieces' rows in piece order, `shard_sequences` rows each. Accounting:
`tokens` = WordPiece tokens of the documents + one `[SEP]` each, and `tokens == sequences *
(seq_len - 1) + dropped_tokens` holds (`dropped_tokens`: the pieces' tails). The same inputs give
the same manifests and byte-identical shards on any number of workers or nodes.

Builds are written into hidden sibling folders and renamed into place at the end, the manifest
last, so a killed build leaves no folder that looks finished. The next build of the same nodes on
the same host, from the same inputs and options, takes a dead build's folders over and resumes
(`corpus_resume`): no scan or training again, packing from the last closed shard on, the same
bytes as a build never killed; folders it cannot resume are removed. The build's driver holds at
most the tokenizer sample and a few pieces' rows; each worker one piece.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import itertools
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from scaling_study import corpus_resume, faults
from scaling_study.artifacts import Manifest, read_manifest
from scaling_study.corpus_passes import (KEY_SPACE, Reading, boundary_piece, bucket_edge, count_piece, document_key,
                                         map_pieces, pack_piece, sample_piece, scan_piece)
from scaling_study.errors import SpecError, UserError
from scaling_study.grid import Node
from scaling_study.sources import PIECE_BYTES, PREFLIGHT_SCAN_BYTES, InputFile, check_sources, input_files, pieces
from scaling_study.spec import DataVolume, Study
from scaling_study.storage import replace_dir
from scaling_study.wordpiece import (PAIR_COUNT_LIMIT, pre_token_counter, save_tokenizer, tokenizers_parallelism,
                                     train_wordpiece)

_ROW_GROUP_BYTES = 4 << 20
_TRAIN_BATCH = 1024


# ----------------------------------------------------------------------------------- preflight


def check_corpus(study: Study, *, scan_bytes: int = PREFLIGHT_SCAN_BYTES) -> list[InputFile]:
    """Refuse a bad corpus before anything runs; returns its input files (URLs are not fetched here).

    `sources.check_sources` reads the first `scan_bytes` as the build reads them (bad bytes, lines,
    records or files raise a UserError naming the file and line or row). When that is the whole
    corpus, a fraction that draws none of its documents is refused too.
    """
    corpus = study.spec.corpus
    if corpus is None:
        return []
    smallest = [KEY_SPACE]

    def visit(text: str) -> None:
        smallest[0] = min(smallest[0], document_key(corpus.seed, text))

    files, documents, complete = check_sources(study, scan_bytes=scan_bytes, visit=visit)
    if complete and documents and not corpus.urls:
        for i, volume in enumerate(study.spec.data_volumes or []):
            if volume.fraction is not None and smallest[0] >= int(volume.fraction * 2**64):
                raise SpecError(study.file, f"data_volumes[{i}]", volume.label,
                                f"a fraction of at least {smallest[0] / 2**64:.2g} (the smallest that draws a "
                                f"document with corpus.seed {corpus.seed}; about 1/{documents:,})",
                                problem=f"selects none of the corpus's {documents:,} documents")
    return files


# ----------------------------------------------------------------------------------- build folders


def _existing(node: Node, out_dir: Path) -> Manifest | None:
    manifest = read_manifest(out_dir)
    if manifest is not None and manifest.node_id != node.id:
        raise UserError(f"{out_dir}: holds the build of corpus node {manifest.node_id}, not {node.id}; "
                        f"allowed: one folder per node (e.g. <storage>/corpus/<node id>)")
    return manifest


def build_corpus(study: Study, node: Node, out_dir: Path | str, **options) -> Manifest:
    """Build one corpus node (`build_corpora` with one node)."""
    return build_corpora(study, [node], [out_dir], **options)[0]


def build_corpora(study: Study, nodes: list[Node], out_dirs: list[Path | str], *, progress: bool = True,
                  shard_sequences: int = 8192, min_shards: int = 16, cache_dir: Path | str | None = None,
                  piece_bytes: int = PIECE_BYTES, pair_limit: int = PAIR_COUNT_LIMIT) -> list[Manifest]:
    """Build corpus nodes of one corpus (its data volumes) into `out_dirs`, in one build; returns
    their manifests. Nodes already built are kept as they are (and not rebuilt).

    shard_sequences: most rows per Parquet shard. min_shards: a build with fewer rows than
    `shard_sequences * min_shards` is split into `min_shards` equal shards instead (fewer only if it
    has fewer rows), so that data-parallel workers each get files. Neither changes the node id or
    the rows. cache_dir: where `corpus.urls` are downloaded (default `<out_dir>/../cache`).
    piece_bytes: size of the pieces; part of the builder (`grid.CORPUS_BUILDER`), not an option to
    vary between builds of one study. pair_limit: the tokenizer sample's most characters.
    Raises `UserError` for a bad corpus or volume.
    """
    if any(n.kind != "corpus" for n in nodes) or len(nodes) != len(out_dirs):
        raise ValueError("build_corpora needs corpus nodes and one folder per node")
    if len({_group(n) for n in nodes}) > 1:
        raise ValueError("build_corpora builds the volumes of one corpus: the nodes differ in more than volume")
    if shard_sequences < 1 or min_shards < 1:
        raise ValueError("shard_sequences and min_shards must be >= 1")
    out_dirs = [Path(d) for d in out_dirs]
    manifests = [_existing(n, d) for n, d in zip(nodes, out_dirs)]
    todo = [i for i, m in enumerate(manifests) if m is None]
    if not todo:
        return manifests
    tmps = [out_dirs[i].parent / f".{out_dirs[i].name}.partial-{socket.gethostname()}-{os.getpid()}" for i in todo]
    cache = Path(cache_dir) if cache_dir is not None else out_dirs[0].parent / "cache"
    build = _Build(study, [nodes[i] for i in todo], tmps, cache, progress=progress, piece_bytes=piece_bytes,
                   pair_limit=pair_limit, shard_sequences=shard_sequences, min_shards=min_shards)
    for i, tmp in zip(todo, tmps):  # a killed build of the same nodes is taken over (corpus_resume)
        out_dirs[i].parent.mkdir(parents=True, exist_ok=True)
        if not corpus_resume.adopt(out_dirs[i], tmp, build.fingerprint):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
    try:
        for i, tmp, manifest in zip(todo, tmps, build.run()):
            if read_manifest(out_dirs[i]) is not None:  # someone else finished the same node meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                manifests[i] = _existing(nodes[i], out_dirs[i])
                continue
            replace_dir(tmp, out_dirs[i])
            manifests[i] = manifest
    except Exception:  # a build that failed by itself would fail again; one that is killed stays, to resume
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifests


def _group(node: Node) -> str:
    return repr(sorted((k, repr(v)) for k, v in node.inputs.items() if k != "volume"))


# ----------------------------------------------------------------------------------- the build


class _Stage:
    """A pass's progress: a bar on the terminal (`progress`) and the study's gauges."""

    def __init__(self, build: _Build, name: str, first: int = 0):
        from tqdm.auto import tqdm

        from scaling_study.progress import CorpusProgress

        self.build, self.name, self.start = build, name, time.monotonic()
        total_bytes = sum(build.piece_sizes)
        self.bar = tqdm(total=len(build.pieces), desc=f"{build.label}: {name}", unit="piece",
                        disable=not build.progress, leave=False, dynamic_ncols=True)
        stage = {"boundary": "count"}.get(name.split()[0], name.split()[0])  # "count 3k tokens" -> "count"
        self.gauges = CorpusProgress(build.study.spec.name, [n.id for n in build.nodes], stage,
                                     len(build.pieces), total_bytes)
        self.done_bytes = sum(build.piece_sizes[:first])  # a resumed pass's pieces before `first`
        self.bar.update(first)

    def __call__(self, i: int, result) -> None:
        self.done_bytes += self.build.piece_sizes[i]
        self.bar.update(1)
        self.gauges.update(i + 1, self.done_bytes)

    def close(self) -> None:
        self.bar.close()
        self.gauges.close()
        self.build.stage_seconds[self.name] = round(time.monotonic() - self.start, 3)


class _Build:
    """One build of a corpus's volumes (see the module docstring); `run` returns their manifests."""

    def __init__(self, study: Study, nodes: list[Node], tmps: list[Path], cache_dir: Path, *, progress: bool,
                 piece_bytes: int, pair_limit: int, shard_sequences: int, min_shards: int):
        self.study, self.nodes, self.tmps, self.progress = study, nodes, tmps, progress
        self.pair_limit, self.shard_sequences, self.min_shards = pair_limit, shard_sequences, min_shards
        inputs = nodes[0].inputs
        self.inputs = inputs
        self.seq_len = int(inputs["seq_len"])
        if self.seq_len < 2:
            raise SpecError(study.file, "pretrain.seq_len", self.seq_len, "at least 2 ([CLS] and one token)",
                            problem="too short to pack")
        self.volumes = [DataVolume(**n.inputs["volume"]) for n in nodes]
        self.reading = Reading(fmt=inputs["format"], text_field=inputs["text_field"], seed=int(inputs["seed"]))
        self.files = input_files(study, cache_dir=cache_dir, download=True)
        self.pieces = pieces(self.files, self.reading.fmt, piece_bytes)
        self.piece_sizes = _piece_sizes(self.pieces, self.reading.fmt)
        self.where = self.files[0].path if len(self.files) == 1 else \
            f"{os.path.dirname(self.files[0].path)} ({len(self.files)} files)"
        self.label = ", ".join(v.label for v in self.volumes)
        self.stage_seconds: dict[str, float] = {}
        self.fingerprint = corpus_resume.fingerprint(
            [n.id for n in nodes], self.files, {"piece_bytes": piece_bytes, "pair_limit": pair_limit,
                                                "shard_sequences": shard_sequences, "min_shards": min_shards})

    def _pass(self, name: str, fn, first: int = 0, **kwargs) -> Iterator:
        """The pass over the pieces from `first` on (a resumed pack), in piece order."""
        stage = _Stage(self, name, first)
        try:
            yield from map_pieces(fn, self.pieces[first:], {"reading": self.reading, **kwargs}, label=name,
                                  on_result=lambda i, result: stage(first + i, result))
        finally:
            stage.close()

    def run(self) -> list[Manifest]:
        self.started = time.monotonic()
        states = corpus_resume.load(self.tmps, self.fingerprint, self.shard_sequences)
        if states is None:
            self.scan()
            extents = [self.extent(v) for v in self.volumes]
            toks, samples = self.tokenizers(extents)
            limits = [extent if v.tokens is None else self.token_limit(v, tok, extent)
                      for v, tok, extent in zip(self.volumes, toks, extents)]
            self.prior_seconds = 0.0
            states = [self.trained_state(tok, sample, limit) for tok, sample, limit in zip(toks, samples, limits)]
            for tmp, state, tok in zip(self.tmps, states, toks):
                tok.save(str(tmp / corpus_resume.TOKENIZER))
                corpus_resume.save(tmp, state)
            faults.point("corpus-checkpoint", 0)
        else:  # a killed build's folders: what it trained, and its closed shards
            self.resume(states)
        packed = self.pack(states)
        seconds = round(time.monotonic() - self.started + self.prior_seconds, 3)
        return [self.manifest(i, tok, state["sample"], result, seconds)
                for i, (tok, state, result) in enumerate(zip(self.toks, states, packed))]

    def trained_state(self, tok, sample: dict, limit: int) -> dict:
        """What packing needs, saved once the tokenizers are trained (corpus_resume)."""
        return {"fingerprint": self.fingerprint, "documents": self.documents, "bytes": self.bytes,
                "sample": sample, "limit": limit, "stage_seconds": self.stage_seconds,
                "seconds": round(time.monotonic() - self.started, 3), "pack": corpus_resume.packing_from_start()}

    def resume(self, states: list[dict]) -> None:
        self.documents, self.bytes = states[0]["documents"], states[0]["bytes"]
        self.prior_seconds = max(s["seconds"] for s in states)
        # the manifest says so: the killed attempts' seconds, kept in build_seconds too
        self.stage_seconds = {**states[0]["stage_seconds"], "resumed after": self.prior_seconds}
        print(f"{self.label}: resuming a killed build at piece {min(s['pack']['piece'] for s in states) + 1} "
              f"of {len(self.pieces)}", file=sys.stderr, flush=True)

    # 1. scan: documents and bytes (and pre-tokens for token counts) per key bucket
    def scan(self) -> None:
        counter = pre_token_counter(bool(self.inputs["cased"])).to_str() \
            if any(v.tokens is not None for v in self.volumes) else None
        self.documents = self.bytes = 0
        self.hist_bytes, self.hist_pre = 0, 0
        for r in self._pass("scan", scan_piece, counter=counter):
            self.documents += r["documents"]
            self.bytes += r["bytes"]
            self.hist_bytes = self.hist_bytes + r["hist_bytes"]
            if counter:
                self.hist_pre = self.hist_pre + r["hist_pre_tokens"]
        if self.documents == 0:
            raise UserError(f"{self.where}: corpus '{self.inputs['name']}' has no documents (every one is blank); "
                            f"allowed: a corpus with at least one non-blank document")

    def extent(self, volume: DataVolume) -> int:
        """The key limit of a fraction; for a token count, a bucket edge whose key prefix contains it."""
        if volume.fraction is not None:
            return min(KEY_SPACE, int(volume.fraction * 2**64))
        return _edge_reaching(self.hist_pre, volume.tokens)

    # 2. sample and train: each volume's smallest keys up to tokenizer_sample bytes
    def tokenizers(self, extents: list[int]) -> tuple[list, list[dict]]:
        cap = _edge_reaching(self.hist_bytes, int(self.inputs["tokenizer_sample"]))
        sample_limits = [min(extent, cap) for extent in extents]
        keys, texts = [], []
        for k, t in self._pass("sample", sample_piece, limit=max(sample_limits)):
            keys.append(k)
            texts.extend(t)
        keys = np.concatenate(keys)
        order = np.argsort(keys, kind="stable")
        keys, texts = keys[order], [texts[i] for i in order]
        toks, samples = [], []
        start = time.monotonic()
        for volume, limit in zip(self.volumes, sample_limits):
            n = len(keys) if limit >= KEY_SPACE else int(np.searchsorted(keys, np.uint64(limit)))
            chars = sum(map(len, texts[:n]))
            toks.append(self.train(volume, texts[:n], chars))
            samples.append({"documents": n, "chars": chars})
        self.stage_seconds["train"] = round(time.monotonic() - start, 3)
        return toks, samples

    def train(self, volume: DataVolume, texts: list[str], chars: int):
        if not texts:
            raise UserError(f"{self.where}: data volume {volume.label} selects none of the {self.documents:,} "
                            f"documents (seed {self.reading.seed}); allowed: a fraction of at least about "
                            f"{1 / self.documents:.2g}")
        if chars > self.pair_limit:
            raise UserError(f"{self.where}: the tokenizer sample of data volume {volume.label} holds {chars:,} "
                            f"characters, more than the WordPiece trainer's 32-bit pair counts can hold "
                            f"({self.pair_limit:,}); allowed: corpus.tokenizer_sample below {self.pair_limit:,} bytes")
        alphabet: set[str] = set()
        for text in texts:
            alphabet.update(text)
        batches = (texts[i:i + _TRAIN_BATCH] for i in range(0, len(texts), _TRAIN_BATCH))
        with tokenizers_parallelism(True):
            return train_wordpiece(batches, alphabet, vocab_size=int(self.inputs["vocab_size"]),
                                   cased=bool(self.inputs["cased"]), min_frequency=int(self.inputs["min_frequency"]))

    # 3. token counts: the key cutoff where a volume's tokens reach its budget
    def token_limit(self, volume: DataVolume, tok, extent: int) -> int:
        spec = tok.to_str()
        hist = 0
        for (h,) in self._pass(f"count {volume.label}", count_piece, tokenizers=[spec], limits=[extent]):
            hist = hist + h
        cum = np.cumsum(hist)
        if int(cum[-1]) < volume.tokens:
            raise UserError(f"{self.where}: data volume {volume.label} is more than the corpus's {int(cum[-1]):,} "
                            f"tokens (with this tokenizer, [SEP] per document included); allowed: at most "
                            f"{int(cum[-1]):,} tokens, or a fraction")
        bucket = int(np.searchsorted(cum, volume.tokens))  # the first bucket where the sum reaches the budget
        before = int(cum[bucket - 1]) if bucket else 0
        keys, counts = [], []
        for ((k, n),) in self._pass(f"boundary {volume.label}", boundary_piece, tokenizers=[spec], buckets=[bucket]):
            keys.append(k)
            counts.append(n)
        keys, counts = np.concatenate(keys), np.concatenate(counts)
        order = np.argsort(keys, kind="stable")
        reached = int(np.searchsorted(before + np.cumsum(counts[order]), volume.tokens))
        return int(keys[order][reached]) + 1

    # 4. tokenize and pack every volume in one pass, writing shards in piece order
    def pack(self, states: list[dict]) -> list[dict]:
        from tokenizers import Tokenizer

        # the saved tokenizers, in a fresh build too: a resumed one packs with exactly what this one does
        toks = self.toks = [Tokenizer.from_file(str(tmp / corpus_resume.TOKENIZER)) for tmp in self.tmps]
        specials = [{name: tok.token_to_id(name) for name in ("[CLS]", "[SEP]")} for tok in toks]
        saved = [state["pack"] for state in states]
        writers = [_ShardWriter(tmp / "shards", self.seq_len, itertools.repeat(self.shard_sequences),
                                corpus_resume.closed_shards(s, self.shard_sequences),
                                on_close=functools.partial(self._checkpoint, tmp, state))
                   for tmp, state, s in zip(self.tmps, states, saved)]
        totals = [dict(s["totals"]) for s in saved]
        first = min(s["piece"] for s in saved)
        for piece, per_volume in enumerate(
                self._pass("pack", pack_piece, first, tokenizers=[t.to_str() for t in toks],
                           limits=[state["limit"] for state in states], seq_len=self.seq_len,
                           starts=[s["piece"] for s in saved],  # a volume further on skips the pieces before
                           cls_id=[s["[CLS]"] for s in specials], sep_id=[s["[SEP]"] for s in specials]), first):
            for writer, total, part, s in zip(writers, totals, per_volume, saved):
                if piece < s["piece"]:  # in this volume's closed shards and totals already
                    continue
                # where this piece's rows start in the volume's stream (the closed shards hold `skip` of them)
                writer.at(piece, total, writer.rows - (s["skip"] if piece == s["piece"] else 0))
                writer.write(part.rows[s["skip"]:] if piece == s["piece"] else part.rows)
                total["documents"] += part.documents
                total["tokens"] += part.tokens
                total["sequences"] += len(part.rows)
                total["dropped_tokens"] += part.dropped
        for writer, total, tmp, volume in zip(writers, totals, self.tmps, self.volumes):
            shards = writer.close()
            if total["sequences"] == 0:
                raise UserError(f"{self.where}: data volume {volume.label} has {total['tokens']} tokens in "
                                f"{total['documents']} documents, less than one sequence of seq_len {self.seq_len} "
                                f"per piece; allowed: a larger data volume or a shorter pretrain.seq_len")
            if len(shards) < self.min_shards and total["sequences"] > len(shards):
                shards = _rebalance(tmp / "shards", shards, min(self.min_shards, total["sequences"]), self.seq_len)
            total["shards"] = shards
        return totals

    def _checkpoint(self, tmp: Path, state: dict, writer: _ShardWriter) -> None:
        """A shard closed: save where packing stands (the piece the next shard starts in, how many
        of its rows the closed ones hold, and the accounting before that piece)."""
        piece, before, piece_start = writer.position
        state["pack"] = {"closed": len(writer.shards), "piece": piece, "skip": writer.closed_rows - piece_start,
                         "totals": before}
        state["seconds"] = round(time.monotonic() - self.started + self.prior_seconds, 3)
        corpus_resume.save(tmp, state)
        faults.point("corpus-checkpoint", len(writer.shards))

    def manifest(self, i: int, tok, sample: dict, packed: dict, seconds: float) -> Manifest:
        tmp, node = self.tmps[i], self.nodes[i]
        corpus_resume.finish(tmp)
        special = save_tokenizer(tok, tmp / "tokenizer")
        manifest = Manifest(
            node_id=node.id, inputs=node.inputs, seq_len=self.seq_len, vocab_size=tok.get_vocab_size(),
            special_tokens=special,
            tokenizer_hash=hashlib.sha256((tmp / "tokenizer" / "tokenizer.json").read_bytes()).hexdigest(),
            corpus_documents=self.documents, tokenizer_documents=sample["documents"],
            tokenizer_chars=sample["chars"], documents=packed["documents"], tokens=packed["tokens"],
            sequences=packed["sequences"], dropped_tokens=packed["dropped_tokens"], shards=packed["shards"],
            pieces=len(self.pieces), corpus_bytes=self.bytes,
            input_files=[{"path": f.path, "bytes": f.size, "mtime": f.mtime} | ({"url": f.url} if f.url else {})
                         for f in self.files],
            build_seconds=seconds, stage_seconds=dict(self.stage_seconds),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        assert manifest.tokens == manifest.sequences * (self.seq_len - 1) + manifest.dropped_tokens
        manifest.write(tmp)
        return manifest


def _piece_sizes(parts: list, fmt: str) -> list[int]:
    """Stored bytes of each piece (for progress): its byte range, or its file's share."""
    per_file: dict[str, int] = {}
    for p in parts:
        per_file[p.file.path] = per_file.get(p.file.path, 0) + 1
    return [p.stop - p.start if fmt != "parquet" and p.file.compression is None and p.stop >= 0
            else p.file.size // per_file[p.file.path] for p in parts]


def _edge_reaching(hist, budget: int) -> int:
    """The smallest bucket edge whose key prefix's sum in `hist` reaches `budget` (all keys if none)."""
    cum = np.cumsum(hist)
    if not len(np.atleast_1d(cum)) or int(cum[-1]) < budget:
        return KEY_SPACE
    return bucket_edge(int(np.searchsorted(cum, budget)))


# ----------------------------------------------------------------------------------- shards


class _ShardWriter:
    """Writes rows of exactly seq_len ids as they come, into shards of `sizes` rows each, after the
    closed `shards` of a resumed build; `on_close(writer)` after each shard it closes."""

    def __init__(self, folder: Path, seq_len: int, sizes: Iterator[int], shards: list[dict] = (),
                 on_close: Callable[[_ShardWriter], None] | None = None):
        import pyarrow as pa

        self.folder, self.seq_len, self.sizes, self.on_close = folder, seq_len, sizes, on_close
        self.target = next(sizes)
        self.schema = pa.schema([("input_ids", pa.list_(pa.int32(), seq_len))])
        self.row_group = max(1, _ROW_GROUP_BYTES // (4 * seq_len))
        self.buffer = np.empty((self.row_group, seq_len), dtype=np.int32)
        self.buffered = 0  # rows in the buffer
        self.in_shard = 0  # rows already written to the open shard
        self.writer = None
        self.shards: list[dict] = [dict(s) for s in shards]
        self.closed_rows = sum(s["sequences"] for s in self.shards)  # rows in closed shards
        self.rows = self.closed_rows  # rows given so far (closed, open shard and buffer)
        self.position: tuple = (0, {}, 0)  # `at`'s
        folder.mkdir(parents=True, exist_ok=True)

    def at(self, piece: int, totals_before: dict, piece_start: int) -> None:
        """The rows that come next are piece `piece`'s, which starts at row `piece_start`."""
        self.position = (piece, dict(totals_before), piece_start)

    def write(self, rows: np.ndarray) -> None:
        self.rows += len(rows)
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
            self.closed_rows += self.in_shard
            self.writer, self.in_shard = None, 0
            self.target = next(self.sizes, self.target)
            if self.on_close is not None:
                self.on_close(self)

    def close(self) -> list[dict]:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.shards


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


