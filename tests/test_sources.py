"""Corpus inputs (scaling_study.sources): every format and compression gives exactly its documents,
pieces partition every file, folders and prefixes pick the format's files, bad files fail with one
line naming the file and line or row, and an S3 prefix (moto's server) reads like a folder."""

from __future__ import annotations

import copy
import gzip
import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scaling_study.errors import SpecError, UserError
from scaling_study.sources import (MAX_DOCUMENT_BYTES, PIECE_BYTES, InputFile, check_sources, document_batches,
                                   input_files, pieces)
from scaling_study.spec import spec_from_data

from conftest import BASE_SPEC, SHARED


def _science_lines() -> list[str]:
    """~20 abstracts from the ../shared science corpus (non-ASCII included), or a few inline ones."""
    source = SHARED / "corpus" / "matsci_glass_abstracts.txt"
    if source.is_file():
        with source.open(encoding="utf-8") as f:
            return [line.rstrip("\n")[:600] for _, line in zip(range(20), f)]
    return ["The quark pair creation (QPC) model predicts a width of 190 eV (204 ± 22 eV measured).",
            "Gold nanoparticles grown on indium tin oxide glass; sizes of 20–35 nm by SEM and UV–Vis.",
            "Absorption spectra of Yb³⁺ in phosphate glass between 8 and 300 K show a blue shift.",
            "Cold pre-forging refines the grains of the Al–Mg alloy; hardness rises by 12 %."] * 5


LINES = _science_lines()
DOCS = [f"  {LINES[0]}", *LINES[1:], "\u00a0"]  # leading spaces are text; a no-break space is not blank


def study_for(tmp_path: Path, paths: list[str], fmt: str = "text", text_field: str = "text", urls=()):
    data = copy.deepcopy(BASE_SPEC)
    data["corpus"].update(paths=list(paths), urls=list(urls), format=fmt, text_field=text_field)
    return spec_from_data(data, str(tmp_path / "spec.yaml"))


def write(path: Path, data: bytes) -> Path:
    """`data` into `path`, compressed as its suffix says (pyarrow's codecs, as the reader's)."""
    codec = {".gz": "gzip", ".zst": "zstd"}.get(path.suffix)
    if codec is None:
        path.write_bytes(data)
    else:
        with pa.CompressedOutputStream(str(path), codec) as out:
            out.write(data)
    return path


def text_bytes(docs: list[str]) -> bytes:
    """One document per line with what a reader must skip or strip: a byte-order mark, blank and
    whitespace lines, CRLF endings, no newline at the end."""
    body = "\ufeff" + docs[0] + "\n\n"
    for i, doc in enumerate(docs[1:]):
        body += doc + ("\r\n" if i % 3 == 0 else "\n") + (" \t\n" if i % 4 == 1 else "")
    return body.rstrip("\n").encode()


def jsonl_bytes(docs: list[str]) -> bytes:
    rows = [json.dumps({"id": i, "text": doc, "meta": {"source": "matsci", "n": [i]}}, ensure_ascii=i % 2 == 0)
            for i, doc in enumerate(docs)]
    rows[3:3] = ["", json.dumps({"id": -1, "text": None}), json.dumps({"id": -2, "text": " \n"})]
    return ("\n".join(rows) + "\r\n").encode()


def parquet_file(path: Path, docs: list[str], row_group_size: int = 4) -> Path:
    """Row groups of 4 rows, with a null, an empty and a blank document among them."""
    texts = docs[:5] + [None, "", "\n"] + docs[5:]
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path, row_group_size=row_group_size)
    return path


def read_all(files: list[InputFile], fmt: str, piece_bytes: int = PIECE_BYTES, text_field: str = "text",
             **batching) -> list[str]:
    return [doc for piece in pieces(files, fmt, piece_bytes)
            for batch in document_batches(piece, fmt, text_field, **batching) for doc in batch]


def only_file(tmp_path: Path, path: Path, fmt: str, text_field: str = "text") -> list[InputFile]:
    return input_files(study_for(tmp_path, [path.name], fmt, text_field), cache_dir=tmp_path / "cache",
                       download=False)


# ----------------------------------------------------------------------------------- documents


@pytest.mark.parametrize("fmt,name", [("text", "c.txt"), ("text", "c.txt.gz"), ("text", "c.txt.zst"),
                                      ("jsonl", "c.jsonl"), ("jsonl", "c.jsonl.gz"), ("jsonl", "c.jsonl.zst"),
                                      ("parquet", "c.parquet")])
def test_every_format_and_compression_gives_exactly_the_documents(tmp_path, fmt, name):
    path = tmp_path / name
    if fmt == "parquet":
        parquet_file(path, DOCS)
    else:
        write(path, text_bytes(DOCS) if fmt == "text" else jsonl_bytes(DOCS))
    files = only_file(tmp_path, path, fmt)
    assert [(f.path, f.compression, f.field) for f in files] == [
        (str(path), {".gz": "gzip", ".zst": "zstd"}.get(path.suffix), "corpus.paths[0]")]
    assert files[0].size == path.stat().st_size
    assert read_all(files, fmt) == DOCS
    # small pieces (Parquet: a row group each) and small batches change nothing but the cuts
    assert read_all(files, fmt, piece_bytes=700, batch_docs=3, batch_chars=900) == DOCS
    batches = [b for p in pieces(files, fmt, 700) for b in document_batches(p, fmt, "text", 3, 900)]
    assert all(len(b) <= 3 and (sum(map(len, b[:-1])) < 900) for b in batches)
    if fmt == "parquet":
        assert len(pieces(files, fmt, 1)) == pq.ParquetFile(path).metadata.num_row_groups > 2
    elif not files[0].compression:
        assert len(pieces(files, fmt, 700)) > 5
    else:
        assert [(p.start, p.stop) for p in pieces(files, fmt, 700)] == [(0, -1)]  # a stream: one piece


def test_the_same_text_is_the_same_documents_in_every_format(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(DOCS) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d + "\n"}) + "\n" for d in DOCS))
    pq.write_table(pa.table({"text": [d + "\r\n" for d in DOCS]}), tmp_path / "a.parquet")
    got = {fmt: read_all(only_file(tmp_path, tmp_path / f"a.{ext}", fmt), fmt)
           for fmt, ext in (("text", "txt"), ("jsonl", "jsonl"), ("parquet", "parquet"))}
    assert got["text"] == got["jsonl"] == got["parquet"] == DOCS


def _lines_by_start(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, line) of every line of a file, computed independently of the reader."""
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # what follows the last newline is no line
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    return list(zip(starts, lines))


def test_pieces_partition_every_line_whatever_their_size(tmp_path):
    rng = random.Random(13)
    lines = [rng.choice(LINES)[:rng.randrange(0, 200)] for _ in range(150)]
    data = "\n".join(lines).encode() + b"\n" * rng.randrange(3)
    path = tmp_path / "p.txt"
    path.write_bytes(data)
    files = only_file(tmp_path, path, "text")
    expected_all = read_all(files, "text", piece_bytes=1 << 30)
    by_start = _lines_by_start(data)
    for piece_bytes in [1, 2, 3, 17, 100, 333, rng.randrange(1, 2000), rng.randrange(1, 2000), len(data) - 1]:
        cut = pieces(files, "text", piece_bytes)
        assert [(p.start, p.stop) for p in cut] == [(s, min(s + piece_bytes, len(data)))
                                                    for s in range(0, len(data), piece_bytes)]
        assert [p.index for p in cut] == list(range(len(cut)))
        got = []
        for p in cut:
            docs = [d for b in document_batches(p, "text", "text") for d in b]
            assert docs == [line.decode() for start, line in by_start if p.start <= start < p.stop and line.strip()]
            got += docs
        assert got == expected_all == [line for line in lines if line.strip()]


def test_jsonl_pieces_partition_too(tmp_path):
    path = write(tmp_path / "p.jsonl", jsonl_bytes(DOCS * 3))
    files = only_file(tmp_path, path, "jsonl")
    for piece_bytes in (1, 50, 777, 5000):
        assert read_all(files, "jsonl", piece_bytes) == DOCS * 3


def test_pieces_of_several_files_number_in_reading_order(tmp_path):
    for name in ("b.txt", "a.txt.gz", "c.txt"):
        write(tmp_path / name, text_bytes(DOCS))
    files = input_files(study_for(tmp_path, ["c.txt", "."]), cache_dir=tmp_path / "cache", download=False)
    assert [Path(f.path).name for f in files] == ["a.txt.gz", "b.txt", "c.txt", "c.txt"]  # "." sorts first
    cut = pieces(files, "text", 2000)
    assert [p.index for p in cut] == list(range(len(cut)))
    assert [p.file for p in cut] == sorted((p.file for p in cut), key=files.index)
    assert read_all(files, "text", 2000) == DOCS * 4
    assert pieces(files, "text", 2000) == cut  # deterministic


# ----------------------------------------------------------------------------------- input files


def test_a_folder_gives_the_formats_files_sorted_by_name(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("b.txt", "a.txt.zst", "c.txt.gz", "notes.md"):
        write(data / name, text_bytes(DOCS))
    for name in ("e.jsonl.gz", "d.jsonl", "f.json.gz", "g.json"):
        write(data / name, jsonl_bytes(DOCS))
    parquet_file(data / "h.parquet", DOCS)
    (data / "sub.txt").mkdir()  # a folder with a text suffix is not a file; folders are not entered
    write(data / "sub.txt" / "deep.txt", b"deep\n")

    def names(fmt, paths=("data",)):
        files = input_files(study_for(tmp_path, list(paths), fmt), cache_dir=tmp_path / "cache", download=False)
        return [Path(f.path).name for f in files]

    assert names("text") == ["a.txt.zst", "b.txt", "c.txt.gz"]
    assert names("jsonl") == ["d.jsonl", "e.jsonl.gz", "f.json.gz"]
    assert names("parquet") == ["h.parquet"]
    assert names("text", ["data/notes.md"]) == ["notes.md"]  # named: taken whatever its suffix
    files = input_files(study_for(tmp_path, ["data"], "jsonl"), cache_dir=tmp_path / "cache", download=False)
    assert read_all(files, "jsonl") == DOCS * 3


def test_path_errors_name_the_field_and_what_is_allowed(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [(["nowhere.txt"], "text", r"spec\.yaml: corpus\.paths\[0\]: no such file or folder: .*nowhere\.txt"),
             (["a.txt", "empty"], "jsonl", r"corpus\.paths\[1\]: folder .*empty holds no \*\.jsonl file \(nor "
                                           r"\*\.jsonl\.gz, \*\.jsonl\.zst, \*\.json\.gz\)"),
             ([f"{(tmp_path / 'gone').as_uri()}/"], "text", r"corpus\.paths\[0\]: no such object or prefix: file://")]
    (tmp_path / "a.txt").write_text("x\n")
    for paths, fmt, message in cases:
        with pytest.raises(SpecError, match=message) as err:
            input_files(study_for(tmp_path, paths, fmt), cache_dir=tmp_path / "cache", download=False)
        assert "\n" not in str(err.value) and "allowed: " in str(err.value)
    parquet_gz = write(tmp_path / "x.parquet.gz", b"PAR1")
    with pytest.raises(SpecError, match="a Parquet file cannot be read through gzip"):
        only_file(tmp_path, parquet_gz, "parquet")


def test_file_uris_read_in_place_and_urls_download(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write(data / "a.txt.gz", text_bytes(DOCS))
    write(data / "b.txt", text_bytes(DOCS))
    served = write(tmp_path / "c.txt.zst", text_bytes(DOCS))
    study = study_for(tmp_path, [data.as_uri() + "/"], urls=[served.as_uri()])
    cache = tmp_path / "cache"
    before = input_files(study, cache_dir=cache, download=False)
    assert before[-1].size == -1 and before[-1].url == served.as_uri()  # not fetched yet
    files = input_files(study, cache_dir=cache, download=True)
    assert [f.path for f in files[:2]] == [(data / "a.txt.gz").as_uri(), (data / "b.txt").as_uri()]
    assert files[2].path.startswith(str(cache)) and files[2].compression == "zstd"
    assert [f.field for f in files] == ["corpus.paths[0]", "corpus.paths[0]", "corpus.urls[0]"]
    assert read_all(files, "text", 500) == DOCS * 3


# ----------------------------------------------------------------------------------- bad files


def _first_error(files: list[InputFile], fmt: str, piece_bytes: int, text_field: str = "text") -> tuple[str, int]:
    """The message of the first piece that fails, and that piece's start."""
    for piece in pieces(files, fmt, piece_bytes):
        try:
            for _ in document_batches(piece, fmt, text_field):
                pass
        except UserError as exc:
            assert "\n" not in str(exc) and "; allowed: " in str(exc), str(exc)
            return str(exc), piece.start
    raise AssertionError("no piece failed")


def test_bad_utf8_in_a_later_piece_names_the_files_line(tmp_path):
    lines = [line.encode() for line in LINES * 10]
    lines[149] = b"Glass transition of caf\xe9 films"
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    message, start = _first_error(only_file(tmp_path, path, "text"), "text", 4096)
    assert start > 0
    assert message == (f"{path}:150: not UTF-8 (byte 0xe9 at byte 24 of the line); allowed: UTF-8 text, "
                       "one document per line")


def test_a_line_over_the_limit_is_refused_by_the_piece_it_starts_in(tmp_path):
    path = tmp_path / "long.txt"
    path.write_bytes(b"ok\n" * 1000 + b"x" * (MAX_DOCUMENT_BYTES + 1) + b"\nafter\n")
    files = only_file(tmp_path, path, "text")
    message, start = _first_error(files, "text", 4 << 20)
    assert message.startswith(f"{path}:1001: a line longer than {MAX_DOCUMENT_BYTES:,} bytes")
    assert start == 0
    later = [p for p in pieces(files, "text", 4 << 20) if p.start > 3000]
    assert [d for p in later for b in document_batches(p, "text", "text") for d in b] == ["after"]


@pytest.mark.parametrize("line,fragment", [
    ('{"text": "a glass"', "not JSON (Expecting ',' delimiter at column 19)"),
    ('[1, 2]', "a JSON array, not an object"),
    ('{"body": "a glass", "id": 7}', "no field 'text' (the object has 'body', 'id')"),
    ('{"text": 3.5}', "field 'text' is a JSON number, not a string"),
    ('{"text": "\\ud835 lone"}', "field 'text' holds a lone UTF-16 surrogate (\\ud835), not Unicode text"),
])
def test_bad_json_lines_name_the_files_line(tmp_path, line, fragment):
    rows = jsonl_bytes(DOCS * 4).decode().split("\n")
    rows[60] = line
    path = write(tmp_path / "bad.jsonl.gz", "\n".join(rows).encode())
    message, _ = _first_error(only_file(tmp_path, path, "jsonl"), "jsonl", 1000)
    assert message.startswith(f"{path}:61: {fragment}; allowed: UTF-8 JSON lines, one object per line with a "
                              f"string field 'text' (corpus.text_field)"), message
    plain = write(tmp_path / "bad.jsonl", "\n".join(rows).encode())  # in a piece that starts mid-file
    message, start = _first_error(only_file(tmp_path, plain, "jsonl"), "jsonl", 1000)
    assert start > 0 and message.startswith(f"{plain}:61: {fragment}")


def test_parquet_without_the_text_column_or_not_parquet(tmp_path):
    path = parquet_file(tmp_path / "c.parquet", DOCS)
    message, _ = _first_error(only_file(tmp_path, path, "parquet", "body"), "parquet", PIECE_BYTES, "body")
    assert message == (f"{path}: no column 'body' (columns: 'id', 'text'); allowed: Parquet files with a string "
                       "column 'body' (corpus.text_field)")
    numbers = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
    message, _ = _first_error(only_file(tmp_path, numbers, "parquet"), "parquet", PIECE_BYTES)
    assert message.startswith(f"{numbers}: column 'text' is int64, not a string")
    fake = write(tmp_path / "fake.parquet", text_bytes(DOCS))
    with pytest.raises(UserError, match=rf"^{re.escape(str(fake))}: not a Parquet file \(.*\); allowed: Parquet"):
        pieces(only_file(tmp_path, fake, "parquet"), "parquet")


def test_corrupt_streams_and_binary_files(tmp_path):
    good = gzip.compress(text_bytes(DOCS * 50))
    truncated = write(tmp_path / "cut.txt.gz", b"")
    truncated.write_bytes(good[:len(good) // 2])
    message, _ = _first_error(only_file(tmp_path, truncated, "text"), "text", PIECE_BYTES)
    assert message.startswith(f"{truncated}: not a valid gzip stream (")
    zst = write(tmp_path / "bad.jsonl.zst", jsonl_bytes(DOCS))
    zst.write_bytes(zst.read_bytes()[:-9])
    message, _ = _first_error(only_file(tmp_path, zst, "jsonl"), "jsonl", PIECE_BYTES)
    assert message.startswith(f"{zst}: not a valid zstd stream (")
    binary = write(tmp_path / "corpus.txt", b"first line\n" + good[:100])
    message, _ = _first_error(only_file(tmp_path, binary, "text"), "text", PIECE_BYTES)
    assert re.match(rf"{re.escape(str(binary))}:2: a NUL byte at byte \d+ of the file: a binary file, or UTF-16 "
                    r"text \(or compressed, without a \.gz or \.zst name\)", message), message


# ----------------------------------------------------------------------------------- preflight


def test_check_sources_reads_what_the_build_reads_up_to_its_budget(tmp_path):
    write(tmp_path / "a.txt", text_bytes(DOCS))
    write(tmp_path / "b.txt.gz", text_bytes(DOCS))
    seen: list[str] = []
    files, documents, complete = check_sources(study_for(tmp_path, ["a.txt", "b.txt.gz"]), visit=seen.append)
    assert complete and documents == 2 * len(DOCS) and seen == DOCS * 2 and len(files) == 2
    _, documents, complete = check_sources(study_for(tmp_path, ["a.txt", "b.txt.gz"]), scan_bytes=100)
    assert not complete and 0 < documents < 2 * len(DOCS)
    # URLs are not downloaded here, nor listed; a bad local file is refused as the build refuses it
    url_study = study_for(tmp_path, ["a.txt"], urls=["https://example.org/corpus.txt"])
    assert [Path(f.path).name for f in check_sources(url_study)[0]] == ["a.txt"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: no field 'text'"):
        check_sources(study_for(tmp_path, ["bad.jsonl"], "jsonl"))


def test_check_sources_refuses_a_corpus_without_documents(tmp_path):
    (tmp_path / "a.txt").write_text("\n \r\n")
    (tmp_path / "b.jsonl").write_text('{"text": null}\n{"text": "  "}\n')
    with pytest.raises(UserError, match=r"a\.txt: corpus 'toy' has no documents \(every file is empty or blank\)"):
        check_sources(study_for(tmp_path, ["a.txt"]))
    with pytest.raises(UserError, match=r"b\.jsonl: corpus 'toy' has no documents \(no line has a non-blank 'text'"):
        check_sources(study_for(tmp_path, ["b.jsonl"], "jsonl"))
    # documents may still come from the URLs
    assert check_sources(study_for(tmp_path, ["a.txt"], urls=["https://example.org/c.txt"]))[1:] == (0, True)


# ----------------------------------------------------------------------------------- object stores


def test_an_s3_prefix_reads_like_a_folder(tmp_path, s3_server):
    bucket = s3_server.bucket()
    name = bucket[len("s3://"):]
    client = s3_server.client
    client.put_object(Bucket=name, Key="corpus/b.jsonl.gz", Body=gzip.compress(jsonl_bytes(DOCS)))
    client.put_object(Bucket=name, Key="corpus/a.txt", Body=text_bytes(DOCS))
    client.put_object(Bucket=name, Key="corpus/deeper/c.jsonl", Body=jsonl_bytes(DOCS))
    client.put_object(Bucket=name, Key="corpus/notes.md", Body=b"not corpus\n")

    def files_of(paths, fmt):
        return input_files(study_for(tmp_path, paths, fmt), cache_dir=tmp_path / "cache", download=False)

    jsonl = files_of([f"{bucket}/corpus/"], "jsonl")
    assert [(f.path, f.compression) for f in jsonl] == [(f"{bucket}/corpus/b.jsonl.gz", "gzip")]
    assert read_all(jsonl, "jsonl") == DOCS
    text = files_of([f"{bucket}/corpus"], "text")  # a "directory" without the slash lists the same
    assert [(f.path, f.size) for f in text] == [(f"{bucket}/corpus/a.txt", len(text_bytes(DOCS)))]
    assert read_all(text, "text", piece_bytes=300) == DOCS  # ranged reads, pieces mid-object
    assert read_all(files_of([f"{bucket}/corpus/notes.md"], "text"), "text") == ["not corpus"]
    assert check_sources(study_for(tmp_path, [f"{bucket}/corpus/"], "jsonl"))[1:] == (len(DOCS), True)
    with pytest.raises(SpecError, match=rf"corpus\.paths\[0\]: no such object or prefix: {bucket}/nothing/"):
        files_of([f"{bucket}/nothing/"], "text")
