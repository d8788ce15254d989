"""The corpus's input side: which files, cut into work units ("pieces"), read as documents.

    from scaling_study.sources import check_sources, document_batches, input_files, pieces
    files, seen, complete = check_sources(study)          # preflight: bad files raise UserError
    corpus = study.spec.corpus
    files = input_files(study, cache_dir=cache, download=True)   # reading order, URLs fetched
    for piece in pieces(files, corpus.format):                   # picklable work units, deterministic
        for batch in document_batches(piece, corpus.format, corpus.text_field):  # list[str], file order
            ...

Sources, in reading order: `sorted(corpus.paths)` then `sorted(corpus.urls)` (as the corpus node
lists them). A path is a local file or folder (relative to the spec's folder, `${VAR}` expanded), or
a URI read in place through pyarrow.fs: `s3://bucket/key`, `gs://bucket/key`, `file:///abs/path`
(an S3-compatible server other than AWS is named in `$AWS_ENDPOINT_URL`, as for `storage.root`).
A folder, a prefix ending in `/` or an object-store "directory" contributes its files with the
format's suffixes (`SUFFIXES`), sorted by name, not recursing; a file named explicitly is taken
whatever its name. Any other URL (`http(s)://`, and everything under `corpus.urls`) is downloaded
once into the cache folder. A name ending in `.gz` or `.zst` is read through gzip or zstd.

Formats (`corpus.format`): `text`, one document per line; `jsonl`, one JSON object per line whose
`text_field` holds the document; `parquet`, the string column `text_field`. Every format gives the
same documents for the same text: trailing "\\r" and "\\n" stripped, a UTF-8 byte-order mark at
the start of a file dropped, and documents that are empty, null or only ASCII whitespace skipped.

Pieces. An uncompressed text or JSONL file is cut into byte ranges of `PIECE_BYTES`; a piece holds
the lines that start in its range, so every line belongs to exactly one piece and reading the
pieces in order reads the file. A compressed file is one piece (a gzip or zstd stream cannot be
entered in the middle). A Parquet file is cut into runs of consecutive row groups whose
uncompressed size (the footer's `total_byte_size`, all columns: what a reader decodes) reaches
`PIECE_BYTES`. Every file, even an empty one, is at least one piece. The cut depends only on the
files' sizes (and Parquet footers) and `piece_bytes`: the same inputs give the same pieces.

Errors are `UserError`s of one line naming the file (path or URI) and the line (text, JSONL) or
row (Parquet, counting from 1): a binary file (a NUL byte in its first BINARY_SNIFF_BYTES), bytes
that are not UTF-8, a line over MAX_DOCUMENT_BYTES, a JSON line that is not an object with a string
`text_field`, a Parquet file without such a column, a corrupt gzip or zstd stream. A piece starting
mid-file still reports the file's real line number (counted when the error happens).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import re
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from scaling_study.downloads import ENV_OFFLINE, DownloadError, fetch
from scaling_study.errors import SpecError, UserError, file_problem, show_value
from scaling_study.spec import Study
from scaling_study.storage import SCHEMES

FORMATS = ("text", "jsonl", "parquet")
SUFFIXES = {"text": (".txt", ".txt.gz", ".txt.zst"),
            "jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz"),
            "parquet": (".parquet",)}
"""The files a folder or prefix contributes, per format."""
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
READ_IN_PLACE = SCHEMES
"""URI schemes of `corpus.paths` read through pyarrow.fs (file, s3, gs); other URLs are downloaded."""
PIECE_BYTES = 64 << 20
"""Work unit of a build: uncompressed text and JSONL files are cut into byte ranges of this size,
Parquet files into row-group runs of about this uncompressed size."""
MAX_DOCUMENT_BYTES = 16 << 20
"""Longest document (line) a corpus file may hold: 16 MiB, 100x the longest full-text paper of the
science corpus (142 kB). A longer line is refused with its file and line number rather than read
whole into memory: it is a file without newlines, or not text."""
BINARY_SNIFF_BYTES = 8000
"""A NUL byte among a file's first 8,000 bytes makes it binary (as git decides). NULs further in are
kept: real text has them (74 in one file of the science corpus); the tokenizer drops them."""
PREFLIGHT_SCAN_BYTES = 256 << 20
"""How much of the corpus `check_sources` reads before a run starts (see there)."""

_CHUNK = 8 << 20  # bytes per read; below MAX_DOCUMENT_BYTES, so only a region's first line can be long
_BOM = b"\xef\xbb\xbf"
_BLANK = " \t\n\r\x0b\x0c"  # what bytes.strip() strips: a blank line is only these
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_THREADS = 8  # Parquet footers read at once (one GET each on object stores)
assert _CHUNK <= MAX_DOCUMENT_BYTES


@dataclass(frozen=True)
class InputFile:
    """One input file of the corpus, as resolved (see the module docstring)."""

    path: str
    """A local absolute path, or a URI (s3://bucket/key, gs://..., file:///...)."""
    size: int
    """Bytes as stored (compressed size for .gz/.zst); -1 for a URL not downloaded yet."""
    mtime: float | None
    """Seconds since the epoch; None where the store gives none (or a URL not downloaded yet)."""
    compression: str | None
    """None, "gzip" or "zstd" (from the suffix .gz / .zst)."""
    field: str
    """The spec field it came from, e.g. "corpus.paths[1]" (for messages)."""
    url: str | None = None
    """For downloads: the URL it was fetched from."""


@dataclass(frozen=True)
class Piece:
    """A work unit: lines starting in bytes [start, stop) (uncompressed text/JSONL), the whole
    file (compressed: (0, -1)), or row groups [start, stop) (Parquet)."""

    index: int
    file: InputFile
    start: int
    stop: int


# ----------------------------------------------------------------------------------- input files


def _is_url(source: str) -> bool:
    return bool(_URL.match(source))


def _scheme(source: str) -> str:
    return source.split("://", 1)[0].lower()


def _downloaded(source: str, key: str) -> bool:
    """Fetched into the cache (corpus.urls, and URLs in corpus.paths not read in place)."""
    return _is_url(source) and (key == "urls" or _scheme(source) not in READ_IN_PLACE)


def compression_of(name: str) -> str | None:
    """"gzip" for a name ending in .gz, "zstd" for .zst, else None."""
    return next((codec for suffix, codec in COMPRESSION.items() if name.lower().endswith(suffix)), None)


def cached_name(url: str) -> str:
    """The file name of a downloaded URL in the cache: a hash of the URL and its last part."""
    base = Path(urllib.parse.urlparse(url).path).name or "corpus.txt"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-80:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"


def _download(url: str, dest: Path, study: Study, field: str) -> None:
    """Fetch `url` into `dest` once (scaling_study.downloads: atomic, refused offline)."""
    try:
        fetch(url, dest)
    except DownloadError as exc:
        yourself = "download it yourself and list it under corpus.paths"
        if exc.offline:
            allowed, problem = f"unset {ENV_OFFLINE}, or {yourself}", exc.reason
        else:
            allowed, problem = f"a reachable URL of a corpus file, or {yourself}", f"cannot download ({exc.reason})"
        raise SpecError(study.file, field, url, allowed, problem=problem) from None


_NOUN = {"text": "text file", "jsonl": "JSON-lines file", "parquet": "Parquet file"}


def _kinds(fmt: str, plural: bool = True) -> str:
    """A folder's files in words: "*.txt files (or *.txt.gz, *.txt.zst)"; "*.txt file (nor ...)"."""
    first, *rest = (f"*{s}" for s in SUFFIXES[fmt])
    if plural:
        return f"{first} files" + (f" (or {', '.join(rest)})" if rest else "")
    return f"{first} file" + (f" (nor {', '.join(rest)})" if rest else "")


def input_files(study: Study, *, cache_dir: Path, download: bool) -> list[InputFile]:
    """The corpus's input files in reading order (see the module docstring).

    URLs map to their file in `cache_dir`, fetched if `download` (else size -1 until they are).
    Raises `SpecError` for a missing path or object, a folder or prefix without the format's
    files, a FIFO or device, an unsupported scheme or a failed download.
    """
    corpus = study.spec.corpus
    if corpus is None:
        return []
    sources = [("paths", s) for s in sorted(corpus.paths)] + [("urls", s) for s in sorted(corpus.urls)]
    return _resolve(study, sources, Path(cache_dir), download)


def _resolve(study: Study, sources: list[tuple[str, str]], cache_dir: Path, download: bool) -> list[InputFile]:
    corpus = study.spec.corpus
    files: list[InputFile] = []
    for key, source in sources:
        field = f"corpus.{key}[{getattr(corpus, key).index(source)}]"
        if _downloaded(source, key):
            files.append(_url_file(study, source, field, cache_dir, download))
        elif _is_url(source):
            files.extend(_uri_files(study, source, field))
        else:
            files.extend(_local_files(study, source, field))
    if corpus.format == "parquet":
        for f in files:
            if f.compression:
                raise SpecError(study.file, f.field, f.path, "Parquet files as they are (Parquet compresses "
                                "inside: .parquet)", problem=f"a Parquet file cannot be read through {f.compression}")
    return files


def _url_file(study: Study, url: str, field: str, cache_dir: Path, download: bool) -> InputFile:
    dest = cache_dir / cached_name(url)
    if download:
        _download(url, dest, study, field)
    compression = compression_of(urllib.parse.urlsplit(url).path)
    try:
        st = dest.stat()
    except FileNotFoundError:
        return InputFile(str(dest), -1, None, compression, field, url)
    return InputFile(str(dest), st.st_size, st.st_mtime, compression, field, url)


def _local(path: Path, field: str) -> InputFile:
    st = path.stat()
    return InputFile(str(path), st.st_size, st.st_mtime, compression_of(path.name), field)


def _not_regular(path: Path | str, problem: str) -> str:
    return f"{path} is {problem}" if problem.startswith("a ") else f"{path}: {problem}"


def _local_files(study: Study, source: str, field: str) -> list[InputFile]:
    fmt = study.spec.corpus.format
    path = study.resolve_path(source)
    problem = file_problem(path)
    if problem is None:
        return [_local(path, field)]
    if problem == "no such file":
        raise SpecError(study.file, field, source,
                        f"an existing {_NOUN[fmt]}, or a folder of {_kinds(fmt)}; relative paths resolve "
                        "against the spec's folder; ${VAR:-default} expands", problem=f"no such file or folder: {path}")
    if problem != "a folder":
        raise SpecError(study.file, field, source, f"a regular {_NOUN[fmt]}, or a folder of {_kinds(fmt)}",
                        problem=_not_regular(path, problem))
    try:
        found = sorted((p for p in path.iterdir() if p.name.endswith(SUFFIXES[fmt]) and not p.is_dir()),
                       key=lambda p: p.name)
    except OSError as exc:
        raise SpecError(study.file, field, source, "a folder you may read",
                        problem=f"cannot list {path} ({exc.strerror or exc})") from None
    for p in found:  # a FIFO or a device named *.txt would block the build or never end
        if file_problem(p):
            raise SpecError(study.file, field, source, f"regular {_kinds(fmt)}",
                            problem=_not_regular(p, file_problem(p)))
    if not found:
        raise SpecError(study.file, field, source, f"a {_NOUN[fmt]}, or a folder holding {_kinds(fmt)}; "
                        f"corpus.format is {fmt}", problem=f"folder {path} holds no {_kinds(fmt, plural=False)}")
    return [_local(p, field) for p in found]


def _locate(uri: str):
    """(pyarrow filesystem, path on it) of a URI of READ_IN_PLACE."""
    from scaling_study.storage import _filesystem

    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _filesystem("file", ""), urllib.parse.unquote(parts.path)
    return _filesystem(scheme, parts.netloc), f"{parts.netloc}{parts.path}"


def _uri_files(study: Study, uri: str, field: str) -> list[InputFile]:
    import pyarrow as pa
    import pyarrow.fs as pafs

    fmt = study.spec.corpus.format
    if _scheme(uri) != "file" and not urllib.parse.urlsplit(uri).netloc:
        raise SpecError(study.file, field, uri, "s3://bucket/key, gs://bucket/key or file:///abs/path",
                        problem="no bucket in the URI")
    try:
        fs, path = _locate(uri)
        info = fs.get_file_info(path.rstrip("/") or "/")
        if info.type == pafs.FileType.File and not uri.endswith("/"):
            return [_remote(uri, info, field)]
        entries = [] if info.type == pafs.FileType.NotFound else fs.get_file_info(
            pafs.FileSelector(path.rstrip("/"), allow_not_found=True))
    except (OSError, pa.ArrowException) as exc:
        raise SpecError(study.file, field, uri, "a URI this machine can read (credentials from the usual chain; "
                        "$AWS_ENDPOINT_URL for S3-compatible servers)",
                        problem=f"cannot look at {uri} ({str(exc).splitlines()[0]})") from None
    if info.type == pafs.FileType.NotFound and not entries:
        raise SpecError(study.file, field, uri, f"an existing object, or a prefix ending in / holding {_kinds(fmt)}",
                        problem=f"no such object or prefix: {uri}")
    found = sorted((e for e in entries if e.type == pafs.FileType.File and e.base_name.endswith(SUFFIXES[fmt])),
                   key=lambda e: e.base_name)
    if not found:
        raise SpecError(study.file, field, uri, f"a {_NOUN[fmt]}, or a prefix holding {_kinds(fmt)}; "
                        f"corpus.format is {fmt}", problem=f"prefix {uri} holds no {_kinds(fmt, plural=False)}")
    return [_remote(_uri_of(_scheme(uri), e.path), e, field) for e in found]


def _uri_of(scheme: str, path: str) -> str:
    """The URI of a path on the filesystem of `scheme` (s3 and gs paths begin with the bucket)."""
    return f"file://{urllib.parse.quote(path)}" if scheme == "file" else f"{scheme}://{path}"


def _remote(uri: str, info, field: str) -> InputFile:
    mtime = info.mtime.timestamp() if info.mtime is not None else None
    return InputFile(uri, info.size, mtime, compression_of(info.base_name), field)


# ----------------------------------------------------------------------------------- pieces


def pieces(files: list[InputFile], fmt: str, piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """The files' work units in reading order, numbered 0..n-1 (see the module docstring).

    Reads nothing but Parquet footers (several at once); raises UserError for a file that is not
    Parquet under `format: parquet`.
    """
    _check_format(fmt)
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}")
    if any(f.size < 0 for f in files):
        raise ValueError("pieces() needs the files' sizes: download the corpus URLs first")
    if fmt == "parquet":
        with ThreadPoolExecutor(_THREADS) as pool:
            ranges = list(pool.map(lambda f: _row_group_runs(f, piece_bytes), files))
    else:
        ranges = [[(0, -1)] if f.compression else
                  [(i * piece_bytes, min((i + 1) * piece_bytes, f.size))
                   for i in range(max(1, math.ceil(f.size / piece_bytes)))] for f in files]
    flat = [(f, start, stop) for f, runs in zip(files, ranges) for start, stop in runs]
    return [Piece(i, f, start, stop) for i, (f, start, stop) in enumerate(flat)]


def _row_group_runs(file: InputFile, piece_bytes: int) -> list[tuple[int, int]]:
    """Consecutive row groups whose uncompressed size reaches piece_bytes (the last run: the rest)."""
    with _ParquetFile(file) as pf:
        sizes = [pf.metadata.row_group(i).total_byte_size for i in range(pf.metadata.num_row_groups)]
    runs, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        total += size
        if total >= piece_bytes:
            runs.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes) or not runs:
        runs.append((start, len(sizes)))
    return runs


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown corpus format {fmt!r}; allowed: {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------------- opening files


_READABLE = {"text": "a readable UTF-8 text file, one document per line", "jsonl": "a readable JSON-lines file",
             "parquet": "a readable Parquet file"}


def _allowed(fmt: str, text_field: str) -> str:
    if fmt == "jsonl":
        return f"UTF-8 JSON lines, one object per line with a string field '{text_field}' (corpus.text_field)"
    if fmt == "parquet":
        return f"Parquet files with a string column '{text_field}' (corpus.text_field)"
    return "UTF-8 text, one document per line"


def _open(file: InputFile, *, seekable: bool, fmt: str = "text", text_field: str = "text"):
    """A binary file object: local files through Python (its errors read as the OS says them),
    URIs through pyarrow.fs; decompressed where the name says so."""
    import pyarrow as pa

    try:
        if not _is_url(file.path):
            raw = open(file.path, "rb")  # noqa: SIM115 (closed by the caller)
            if not file.compression:
                return raw
            return pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), file.compression)
        fs, path = _locate(file.path)
        if file.compression:
            return fs.open_input_stream(path, compression=file.compression)
        return fs.open_input_file(path) if seekable else fs.open_input_stream(path)
    except (OSError, pa.ArrowException) as exc:  # unreadable, or gone since the sources were resolved
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise UserError(f"{file.path}: cannot read the corpus file ({reason}); allowed: {_READABLE[fmt]}") from None


def _read(f, n: int) -> bytes:
    """Up to n bytes, fewer only at the end (a stream may return less per call)."""
    data = f.read(n)
    if 0 < len(data) < n:
        parts, got = [data], len(data)
        while got < n:
            more = f.read(n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


class _ParquetFile:
    """`pq.ParquetFile` over an InputFile, as a context manager; a file that is not Parquet is a UserError."""

    def __init__(self, file: InputFile, text_field: str = "text"):
        self.file, self.text_field = file, text_field

    def __enter__(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.raw = _open(self.file, seekable=True, fmt="parquet", text_field=self.text_field)
        try:
            return pq.ParquetFile(self.raw)
        except (OSError, pa.ArrowException) as exc:
            self.raw.close()
            raise UserError(f"{self.file.path}: not a Parquet file ({str(exc).splitlines()[0]}); allowed: "
                            f"{_allowed('parquet', self.text_field)}") from None

    def __exit__(self, *exc) -> None:
        self.raw.close()


# ----------------------------------------------------------------------------------- documents


def document_batches(piece: Piece, fmt: str, text_field: str, batch_docs: int = 1024,
                     batch_chars: int = 1 << 20) -> Iterator[list[str]]:
    """The piece's documents in file order, in lists of at most `batch_docs` documents, a list
    ending at the document that takes it to `batch_chars` characters (see the module docstring)."""
    _check_format(fmt)
    return _batched(iter(_PieceDocs(piece, fmt, text_field, batch_docs)), batch_docs, batch_chars)


def _batched(lists: Iterator[list[str]], batch_docs: int, batch_chars: int) -> Iterator[list[str]]:
    """Re-cut lists of documents into batches without a Python step per document (cumulative
    lengths and bisection find where each batch ends)."""
    pending: list[str] = []
    chars = 0
    for docs in lists:
        ends = list(itertools.accumulate(map(len, docs)))
        i = 0
        while i < len(docs):
            before = ends[i - 1] if i else 0
            crossing = bisect.bisect_left(ends, before + batch_chars - chars, lo=i) + 1
            j = min(len(docs), i + batch_docs - len(pending), crossing)
            pending.extend(docs[i:j])
            chars += ends[j - 1] - before
            i = j
            if len(pending) >= batch_docs or chars >= batch_chars:
                yield pending
                pending, chars = [], 0
    if pending:
        yield pending


class _PieceDocs:
    """Iterates a piece's documents as lists (one per region read); `bytes_read` counts the
    uncompressed bytes consumed so far (Parquet: the text column's bytes)."""

    def __init__(self, piece: Piece, fmt: str, text_field: str, batch_rows: int = 1024):
        self.piece, self.fmt, self.text_field, self.batch_rows = piece, fmt, text_field, batch_rows
        self.path = piece.file.path
        self.allowed = _allowed(fmt, text_field)
        self.bytes_read = 0
        self.bom = False  # the file starts with a UTF-8 byte-order mark (set when read from 0)

    def __iter__(self) -> Iterator[list[str]]:
        if self.fmt == "parquet":
            yield from self._parquet()
            return
        parse = self._jsonl if self.fmt == "jsonl" else self._text
        for offset, region in self._regions():
            self.bytes_read += len(region)
            docs = parse(offset, region)
            if docs:
                yield docs

    # ------------------------------------------------------------------ lines

    def _regions(self) -> Iterator[tuple[int, bytes]]:
        """(file offset, bytes) of runs of whole lines, the lines that start in [start, stop)."""
        piece = self.piece
        start, stop = piece.start, (None if piece.stop < 0 else piece.stop)
        if stop is not None and start >= stop:
            return
        with _open(piece.file, seekable=True, fmt=self.fmt, text_field=self.text_field) as f:
            if start > 0:
                f.seek(start - 1)
                carry, offset = self._skip_partial_line(f, start)
                if carry is None:
                    return
            else:
                carry, offset = self._head(f)
            while True:
                if stop is not None and offset >= stop:
                    return
                data = self._chunk(f)
                buffer = carry + data if carry else data
                if stop is not None and stop - offset <= len(buffer):
                    end = buffer.find(b"\n", stop - offset - 1)  # the line holding byte stop-1 ends here
                    if end >= 0:
                        self._check_first_line(offset, buffer)
                        yield offset, buffer[:end + 1]
                        return
                if not data:  # the end of the file: its last line may lack a newline
                    if buffer:
                        self._check_first_line(offset, buffer)
                        yield offset, buffer
                    return
                cut = buffer.rfind(b"\n") + 1
                if cut:
                    self._check_first_line(offset, buffer)
                    yield offset, buffer[:cut]
                    offset += cut
                carry = buffer[cut:]
                if len(carry) > MAX_DOCUMENT_BYTES and len(carry.rstrip(b"\r")) > MAX_DOCUMENT_BYTES:
                    raise self._too_long(offset)

    def _chunk(self, f) -> bytes:
        import pyarrow as pa

        try:
            return _read(f, _CHUNK)
        except (OSError, pa.ArrowException) as exc:
            reason = str(exc).splitlines()[0]
            if self.piece.file.compression:
                raise UserError(f"{self.path}: not a valid {self.piece.file.compression} stream ({reason}); "
                                f"allowed: {self.allowed}, compressed whole") from None
            raise UserError(f"{self.path}: cannot read the corpus file ({reason}); allowed: {self.allowed}") from None

    def _head(self, f) -> tuple[bytes, int]:
        """The file's first bytes, checked for NULs; a byte-order mark is dropped after decoding
        (offsets stay the file's: the first line starts at 0)."""
        head = self._chunk(f)
        nul = head.find(b"\0", 0, BINARY_SNIFF_BYTES)
        if nul >= 0:
            line = head.count(b"\n", 0, nul) + 1
            hint = "" if self.piece.file.compression else " (or compressed, without a .gz or .zst name)"
            raise UserError(f"{self.path}:{line}: a NUL byte at byte {nul + 1} of the file: a binary file, or "
                            f"UTF-16 text{hint}; allowed: {self.allowed}")
        self.bom = head.startswith(_BOM)
        return head, 0

    def _skip_partial_line(self, f, start: int) -> tuple[bytes | None, int]:
        """Read past the line that holds byte start-1 (it belongs to an earlier piece)."""
        skipped = 0
        while True:
            data = self._chunk(f)
            if not data:
                return None, 0
            nl = data.find(b"\n")
            if nl >= 0:
                return data[nl + 1:], start + skipped + nl
            skipped += len(data)
            if skipped > MAX_DOCUMENT_BYTES + 2:  # an over-long line: the piece it starts in refuses it
                return None, 0

    def _check_first_line(self, offset: int, buffer: bytes) -> None:
        """Only a region's first line can be longer than a chunk: the rest lie in the last read."""
        if len(buffer) <= MAX_DOCUMENT_BYTES:
            return
        end = buffer.find(b"\n")
        line = buffer[:end if end >= 0 else len(buffer)]
        if len(line) > MAX_DOCUMENT_BYTES and len(line.rstrip(b"\r")) > MAX_DOCUMENT_BYTES:
            raise self._too_long(offset)

    def _too_long(self, offset: int) -> UserError:
        return UserError(f"{self.path}:{self._line_at(offset)}: a line longer than {MAX_DOCUMENT_BYTES:,} bytes; "
                         f"allowed: {self.allowed}, each at most {MAX_DOCUMENT_BYTES:,} bytes (MAX_DOCUMENT_BYTES)")

    def _line_at(self, offset: int) -> int:
        """The file's line number of byte `offset`: its newlines before it, counted now (errors only)."""
        lines, seen = 1, 0
        with _open(self.piece.file, seekable=False, fmt=self.fmt, text_field=self.text_field) as f:
            while seen < offset:
                data = _read(f, min(_CHUNK, offset - seen))
                if not data:
                    break
                lines += data.count(b"\n")
                seen += len(data)
        return lines

    def _decode(self, offset: int, region: bytes) -> str:
        try:
            text = region.decode("utf-8")
        except UnicodeDecodeError as exc:
            line_start = region.rfind(b"\n", 0, exc.start) + 1
            if offset == 0 and line_start == 0 and self.bom:
                line_start = 3  # counted as the line's bytes after the mark, as the text is
            raise UserError(f"{self.path}:{self._line_at(offset + exc.start)}: not UTF-8 (byte "
                            f"0x{region[exc.start]:02x} at byte {exc.start - line_start + 1} of the line); "
                            f"allowed: {self.allowed}") from None
        return text[1:] if offset == 0 and self.bom else text

    def _text(self, offset: int, region: bytes) -> list[str]:
        text = self._decode(offset, region)
        lines = text.split("\n")
        if "\r" in text:
            lines = [s.rstrip("\r") for s in lines]
        # isspace() stops at the first non-space: cheap; strip() decides for Unicode spaces (kept as text)
        return [s for s in lines if s and (not s.isspace() or s.strip(_BLANK))]

    def _jsonl(self, offset: int, region: bytes) -> list[str]:
        field, loads = self.text_field, json.loads
        docs = []
        for i, line in enumerate(self._decode(offset, region).split("\n")):
            if not line or (line.isspace() and not line.strip(_BLANK)):
                continue
            try:
                text = loads(line)[field]
            except (ValueError, KeyError, TypeError, IndexError):
                raise self._bad_json(offset, i, line) from None
            if type(text) is not str:
                if text is None:
                    continue
                raise self._bad_json(offset, i, line)
            if "\\ud" in line or "\\uD" in line:
                self._check_surrogates(offset, i, text)
            text = text.rstrip("\r\n")
            if text and (not text.isspace() or text.strip(_BLANK)):
                docs.append(text)
        return docs

    def _where(self, offset: int, index: int) -> str:
        return f"{self.path}:{self._line_at(offset) + index}"

    def _bad_json(self, offset: int, index: int, line: str) -> UserError:
        field = self.text_field
        try:
            obj = json.loads(line)
        except ValueError as exc:
            return UserError(f"{self._where(offset, index)}: not JSON ({getattr(exc, 'msg', exc)} at column "
                             f"{getattr(exc, 'colno', '?')}); allowed: {self.allowed}")
        if not isinstance(obj, dict):
            return UserError(f"{self._where(offset, index)}: a JSON {_json_type(obj)}, not an object; "
                             f"allowed: {self.allowed}")
        if field not in obj:
            keys = ", ".join(show_value(k) for k in itertools.islice(obj, 8)) + (", ..." if len(obj) > 8 else "")
            return UserError(f"{self._where(offset, index)}: no field '{field}' (the object has "
                             f"{keys or 'no fields'}); allowed: {self.allowed}")
        return UserError(f"{self._where(offset, index)}: field '{field}' is a JSON {_json_type(obj[field])}, "
                         f"not a string; allowed: {self.allowed}")

    def _check_surrogates(self, offset: int, index: int, text: str) -> None:
        """A `\\ud800` escape alone decodes to a lone surrogate: not Unicode text (the tokenizer
        cannot take it)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UserError(f"{self._where(offset, index)}: field '{self.text_field}' holds a lone UTF-16 "
                            f"surrogate (\\u{ord(text[exc.start]):04x}), not Unicode text; "
                            f"allowed: {self.allowed}") from None

    # ------------------------------------------------------------------ parquet

    def _parquet(self) -> Iterator[list[str]]:
        import pyarrow as pa
        import pyarrow.compute as pc

        piece, field = self.piece, self.text_field
        with _ParquetFile(piece.file, field) as pf:
            self._check_column(pf.schema_arrow)
            if piece.start >= piece.stop:
                return
            row = 1 + sum(pf.metadata.row_group(i).num_rows for i in range(piece.start))
            batches = pf.iter_batches(batch_size=self.batch_rows, row_groups=list(range(piece.start, piece.stop)),
                                      columns=[field], use_threads=False)
            while True:
                try:
                    batch = next(batches, None)
                except (OSError, pa.ArrowException) as exc:
                    raise UserError(f"{self.path}: cannot read row groups {piece.start}-{piece.stop - 1} "
                                    f"({str(exc).splitlines()[0]}); allowed: {self.allowed}") from None
                if batch is None:
                    return
                column = batch.column(0)
                self.bytes_read += column.nbytes
                lengths = pc.binary_length(column)
                if len(column) and (pc.max(lengths).as_py() or 0) > MAX_DOCUMENT_BYTES:
                    at = pc.index(pc.greater(lengths, MAX_DOCUMENT_BYTES), True).as_py()
                    raise UserError(f"{self.path}: row {row + at:,}: a document longer than {MAX_DOCUMENT_BYTES:,} "
                                    f"bytes; allowed: {self.allowed}, each at most {MAX_DOCUMENT_BYTES:,} bytes "
                                    f"(MAX_DOCUMENT_BYTES)")
                docs = self._strings(column, row)
                row += len(column)
                docs = [s.rstrip("\r\n") for s in docs if s is not None]
                docs = [s for s in docs if s and (not s.isspace() or s.strip(_BLANK))]
                if docs:
                    yield docs

    def _check_column(self, schema) -> None:
        import pyarrow as pa

        field = self.text_field
        names = schema.names
        if field not in names:
            shown = ", ".join(show_value(n) for n in names[:12]) + (", ..." if len(names) > 12 else "")
            raise UserError(f"{self.path}: no column '{field}' (columns: {shown or 'none'}); allowed: {self.allowed}")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
            raise UserError(f"{self.path}: column '{field}' is {kind}, not a string; allowed: {self.allowed}")

    def _strings(self, column, row: int) -> list:
        try:
            return column.to_pylist()
        except UnicodeDecodeError:  # bytes written into a string column unchecked: find the row
            for i in range(len(column)):
                try:
                    column[i].as_py()
                except UnicodeDecodeError:
                    raise UserError(f"{self.path}: row {row + i:,}: not UTF-8; allowed: {self.allowed}") from None
            raise


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


# ----------------------------------------------------------------------------------- preflight


def check_sources(study: Study, *, scan_bytes: int = PREFLIGHT_SCAN_BYTES,
                  visit: Callable[[str], None] | None = None) -> tuple[list[InputFile], int, bool]:
    """Refuse a bad corpus before anything runs: (files, documents seen, complete).

    Resolves the local paths and in-place URIs with `input_files`' errors (downloads are not
    fetched here, and `files` leaves them out), then reads documents in reading order as the build
    does, raising the same errors, until `scan_bytes` are read (256 MiB by default: a second or
    two); `visit(text)` sees each document. `complete`: every file was read to its end. A corpus
    whose files hold no document at all, with no URLs that might, is refused here.
    """
    corpus = study.spec.corpus
    if corpus is None:
        return [], 0, True
    local = [("paths", s) for s in sorted(corpus.paths) if not _downloaded(s, "paths")]
    files = _resolve(study, local, Path("."), download=False)
    documents, complete = _scan(files, corpus.format, corpus.text_field, scan_bytes, visit)
    if complete and files and documents == 0 and not corpus.urls:
        _no_documents(study, files)
    return files, documents, complete


def _scan(files: list[InputFile], fmt: str, text_field: str, scan_bytes: int,
          visit: Callable[[str], None] | None) -> tuple[int, bool]:
    """Read the files' documents in order until `scan_bytes`: (documents, whether all were read)."""
    documents, read = 0, 0
    for file in files:
        for piece in pieces([file], fmt):
            if read >= scan_bytes:
                return documents, False
            docs = _PieceDocs(piece, fmt, text_field)
            batches = iter(docs)
            try:
                for batch in batches:
                    documents += len(batch)
                    if visit is not None:
                        for text in batch:
                            visit(text)
                    if read + docs.bytes_read >= scan_bytes:
                        return documents, False
            finally:
                batches.close()  # closes the file now, not when collected
            read += docs.bytes_read
    return documents, True


_NO_DOCUMENTS = {"text": ("every file is empty or blank", "UTF-8 text files with one document per line"),
                 "jsonl": ("no line has a non-blank '{field}'", "JSON lines whose '{field}' holds a document"),
                 "parquet": ("no row has a non-blank '{field}'", "Parquet files whose column '{field}' holds "
                             "documents")}


def _no_documents(study: Study, files: list[InputFile]) -> None:
    corpus = study.spec.corpus
    where = files[0].path if len(files) == 1 else f"{files[0].path.rsplit('/', 1)[0]} ({len(files)} files)"
    what, allowed = (text.format(field=corpus.text_field) for text in _NO_DOCUMENTS[corpus.format])
    raise UserError(f"{where}: corpus '{corpus.name}' has no documents ({what}); allowed: {allowed}")
