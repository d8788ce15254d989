"""Corpus builds: nested seeded subsets, bounded tokenizer samples, exact packing per piece, atomic
and idempotent builds, errors. These run the build's passes in this process (no Ray); the same
builds on Ray Data, on 1 or 2 CPUs and on a 2-node cluster, are in tests/test_corpus_ray.py."""

import functools
import http.server
import json
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from scaling_study import corpus as corpus_mod
from scaling_study import corpus_passes, wordpiece
from scaling_study.artifacts import CorpusBuild, read_manifest
from scaling_study.corpus import build_corpora, build_corpus
from scaling_study.corpus_passes import document_key
from scaling_study.sources import input_files
from scaling_study.wordpiece import load_tokenizer
from scaling_study.errors import UserError
from scaling_study.grid import expand
from scaling_study.spec import spec_from_data

from conftest import REPO, SHARED, needs_mirror

SEQ_LEN = 32
N_DOCS = 1000


def _words() -> list[str]:
    rng = random.Random(0)
    stems = ["protein", "gene", "cell", "model", "neural", "glass", "alloy", "kinase", "tumor", "entity",
             "relation", "corpus", "token", "layer", "graph", "mouse", "dose", "receptor", "oxide", "laser"]
    made = ["".join(rng.choice("abcdefghiklmnoprstuvw") for _ in range(rng.randint(3, 8))) for _ in range(200)]
    words = stems + made
    return words + [w.capitalize() for w in words[:60]] + ["BRCA1", "DNA", "RNA", "BERT", "TiO2"]


def synthetic_docs(n: int = N_DOCS, seed: int = 0) -> list[str]:
    """Documents `dNNNN w w w ...` of 40-70 words: each longer than a sequence, with a unique marker."""
    rng, words = random.Random(seed), _words()
    return [" ".join([f"d{i:04d}"] + rng.choices(words, k=rng.randint(40, 70))) for i in range(n)]


def make_study(tmp_path: Path, base_spec: dict, volumes: list, *, docs: list[str] | None = None,
               write: bool = True, **corpus) -> tuple:
    """A study over `tmp_path/corpus.txt` and its corpus nodes by volume label."""
    if write:
        (tmp_path / "corpus.txt").write_text("\n".join(synthetic_docs() if docs is None else docs) + "\n")
    base_spec["corpus"] = {"name": "toy", "paths": ["corpus.txt"], "vocab_size": 500, **corpus}
    base_spec["data_volumes"] = volumes
    base_spec["pretrain"]["seq_len"] = SEQ_LEN
    study = spec_from_data(base_spec, str(tmp_path / "spec.yaml"))
    return study, {n.factors["data_volume"]: n for n in expand(study).of_kind("corpus")}


def build(study, node, tmp_path: Path, **kwargs):
    out = tmp_path / "builds" / node.id
    return build_corpus(study, node, out, progress=False, **kwargs), out


def rows(out: Path) -> np.ndarray:
    tables = [pq.read_table(p) for p in CorpusBuild.open(out).shard_paths]
    seq_len = tables[0].schema.field("input_ids").type.list_size
    return np.concatenate([t.column("input_ids").combine_chunks().flatten().to_numpy().reshape(-1, seq_len)
                           for t in tables])


def segments(out: Path, manifest) -> list[list[int]]:
    """The packed stream split at [SEP]: whole documents, then the (cut) last one if any."""
    stream = rows(out)[:, 1:].ravel()
    cuts = np.flatnonzero(stream == manifest.special_tokens["sep"])
    parts = np.split(stream, cuts + 1)
    return [p[p != manifest.special_tokens["sep"]].tolist() for p in parts if len(p)]


def markers(out: Path, manifest) -> set[str]:
    """The documents whose start is packed (a piece's last one may lose its dropped tail)."""
    tok = load_tokenizer(out)
    return {m for seg in segments(out, manifest) for m in re.findall(r"\bd\d{4}\b", tok.decode(seg))}


def expected_markers(seed: int, fraction: float, n: int = N_DOCS) -> set[str]:
    docs = synthetic_docs(n)
    return {f"d{i:04d}" for i in range(n) if document_key(seed, docs[i]) / 2**64 < fraction}


# ----------------------------------------------------------------------------------- subsets


def test_fraction_subsets_are_nested_and_seeded(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["1%", "10%", "100%"])
    found = {}
    for label, fraction in (("1%", 0.01), ("10%", 0.1), ("100%", 1.0)):
        manifest, out = build(study, nodes[label], tmp_path)
        found[label] = markers(out, manifest)
        assert found[label] == expected_markers(0, fraction)  # every selected document is packed
        assert manifest.documents == manifest.tokenizer_documents == len(found[label])
        assert manifest.corpus_documents == N_DOCS
    assert found["1%"] and found["1%"] < found["10%"] < found["100%"]
    assert len(found["100%"]) == N_DOCS


def test_same_seed_same_build_other_seed_other_subset(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["10%"])
    first, out1 = build(study, nodes["10%"], tmp_path / "a")
    second, out2 = build(study, nodes["10%"], tmp_path / "b")
    assert first.tokenizer_hash == second.tokenizer_hash
    assert first.shards == second.shards
    for a, b in zip(CorpusBuild.open(out1).shard_paths, CorpusBuild.open(out2).shard_paths):
        assert pq.read_table(a).equals(pq.read_table(b))

    other, nodes7 = make_study(tmp_path, base_spec, ["10%"], write=False, seed=7)
    assert nodes7["10%"].id != nodes["10%"].id
    manifest7, out7 = build(other, nodes7["10%"], tmp_path)
    assert markers(out7, manifest7) == expected_markers(7, 0.1) != markers(out1, first)


@pytest.mark.parametrize("bucket_bits", [16, 3])
def test_token_volumes_are_minimal_key_order_prefixes_and_nested(tmp_path, base_spec, monkeypatch, bucket_bits):
    # 3 bits: 8 buckets of ~125 documents, so the boundary bucket is searched document by document
    monkeypatch.setattr(corpus_passes, "BUCKET_BITS", bucket_bits)
    monkeypatch.setattr(corpus_passes, "BUCKETS", 1 << bucket_bits)
    study, nodes = make_study(tmp_path, base_spec, ["3k", "8k"])
    docs = synthetic_docs()
    found = {}
    manifests = build_corpora(study, [nodes["3k tokens"], nodes["8k tokens"]],
                              [tmp_path / "builds" / "3k", tmp_path / "builds" / "8k"], progress=False)
    for (label, budget), manifest in zip((("3k tokens", 3000), ("8k tokens", 8000)), manifests):
        out = tmp_path / "builds" / label.split()[0]
        tok = load_tokenizer(out)
        by_key = sorted(range(N_DOCS), key=lambda i: document_key(0, docs[i]))
        counts = [len(tok(docs[i], add_special_tokens=False)["input_ids"]) + 1 for i in by_key]
        total = np.cumsum(counts)
        n = int(np.searchsorted(total, budget)) + 1  # the shortest key-order prefix reaching the budget
        assert manifest.documents == n and manifest.tokens == total[n - 1] >= budget > total[n - 2]
        found[label] = markers(out, manifest)
        assert found[label] == {f"d{i:04d}" for i in by_key[:n]}
        assert manifest.tokenizer_documents >= manifest.documents  # trained on a pre-token superset
    assert found["3k tokens"] < found["8k tokens"]


# ----------------------------------------------------------------------------------- packing


def test_rows_are_exact_and_tokens_add_up(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["100%"])
    manifest, out = build(study, nodes["100%"], tmp_path)
    for path in CorpusBuild.open(out).shard_paths:
        column = pq.read_schema(path).field("input_ids").type
        assert column.list_size == SEQ_LEN and str(column.value_type) == "int32"
    data = rows(out)
    assert data.shape == (manifest.sequences, SEQ_LEN) == (sum(s["sequences"] for s in manifest.shards), SEQ_LEN)
    special = manifest.special_tokens
    assert special == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert (data[:, 0] == special["cls"]).all() and (data[:, 1:] != special["cls"]).all()
    assert not np.isin(data, [special["pad"], special["mask"]]).any()  # no padding, no masks

    # Convention: tokens = WordPiece tokens of the documents + one [SEP] each; [CLS] is extra.
    assert manifest.tokens == manifest.sequences * (SEQ_LEN - 1) + manifest.dropped_tokens
    assert 0 <= manifest.dropped_tokens < SEQ_LEN - 1
    tok = load_tokenizer(out)
    docs = synthetic_docs()
    assert manifest.tokens == sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    assert manifest.vocab_size == len(tok) <= 500


def test_documents_are_separated_by_sep_in_corpus_order(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["100%"])
    manifest, out = build(study, nodes["100%"], tmp_path)
    tok, docs = load_tokenizer(out), synthetic_docs()
    parts = segments(out, manifest)
    whole = [tok.decode(p) for p in parts[:N_DOCS - 1]]
    assert manifest.pieces == 1
    assert whole == docs[:N_DOCS - 1]  # long documents continue across rows, unchanged
    assert docs[-1].startswith(tok.decode(parts[-1]))  # the last one may lose its dropped tail


def test_pieces_pack_their_own_streams_and_drop_their_own_tails(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["100%"])
    one, out1 = build(study, nodes["100%"], tmp_path / "one")
    many, out2 = build(study, nodes["100%"], tmp_path / "many", piece_bytes=20_000)
    assert one.pieces == 1 and many.pieces > 10
    assert many.documents == one.documents == N_DOCS and many.tokens == one.tokens
    assert many.tokens == many.sequences * (SEQ_LEN - 1) + many.dropped_tokens
    assert many.dropped_tokens > one.dropped_tokens  # a tail per piece
    tok, docs = load_tokenizer(out2), synthetic_docs()
    firsts = [tok.decode(p).split()[0] for p in segments(out2, many)]
    assert [m for m in firsts if re.fullmatch(r"d\d{4}", m)] == sorted(set(firsts) & {d.split()[0] for d in docs})


def test_shard_size_and_min_shards_keep_the_stream(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["100%"])
    one, out1 = build(study, nodes["100%"], tmp_path / "one", shard_sequences=10**6, min_shards=1)
    small, out2 = build(study, nodes["100%"], tmp_path / "small", shard_sequences=100, min_shards=1)
    even, out3 = build(study, nodes["100%"], tmp_path / "even", shard_sequences=10**6, min_shards=7)
    assert len(one.shards) == 1
    assert [s["sequences"] for s in small.shards][:-1] == [100] * (len(small.shards) - 1)
    assert len(small.shards) == -(-one.sequences // 100)
    sizes = [s["sequences"] for s in even.shards]
    assert len(sizes) == 7 and max(sizes) - min(sizes) <= 1 and sum(sizes) == one.sequences
    assert (rows(out1) == rows(out2)).all() and (rows(out1) == rows(out3)).all()
    assert [p.name for p in CorpusBuild.open(out3).shard_paths] == [f"shard-{i:05d}.parquet" for i in range(7)]


def test_blank_lines_bom_and_crlf(tmp_path, base_spec):
    docs = synthetic_docs(60)
    raw = b"\xef\xbb\xbf" + b"\r\n\r\n".join(d.encode() for d in docs) + b"\r\n  \n"
    (tmp_path / "corpus.txt").write_bytes(raw)
    study, nodes = make_study(tmp_path, base_spec, ["100%"], write=False)
    manifest, out = build(study, nodes["100%"], tmp_path)
    assert manifest.corpus_documents == manifest.documents == 60
    tok = load_tokenizer(out)
    assert [tok.decode(p) for p in segments(out, manifest)[:59]] == docs[:59]


# ----------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("cased", [True, False])
def test_tokenizer_loads_with_auto_tokenizer(tmp_path, base_spec, cased):
    from transformers import AutoTokenizer

    study, nodes = make_study(tmp_path, base_spec, ["100%"], cased=cased)
    manifest, out = build(study, nodes["100%"], tmp_path)
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(tok) == manifest.vocab_size
    ids = tok("a b")["input_ids"]
    assert ids[0] == tok.cls_token_id == manifest.special_tokens["cls"]
    assert ids[-1] == tok.sep_token_id == manifest.special_tokens["sep"]
    assert (tok.pad_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 4)
    text = "Protein binds DNA in the Mouse model"
    if cased:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
        assert tok.convert_tokens_to_ids("Protein") != tok.convert_tokens_to_ids("protein")
    else:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text.lower()
        assert "Protein" not in tok.get_vocab()


@needs_mirror("corpus")
def test_real_text_round_trips_cased(tmp_path, base_spec):
    with open(SHARED / "corpus" / "scitldr_abstracts.txt", encoding="utf-8") as f:
        lines = [next(f).rstrip("\n") for _ in range(300)]
    study, nodes = make_study(tmp_path, base_spec, ["100%"], docs=lines, vocab_size=4000)
    manifest, out = build(study, nodes["100%"], tmp_path)
    tok = load_tokenizer(out)
    words = [w for w in lines[0].split() if w.isalpha()][:30]
    assert any(w[0].isupper() for w in words)
    assert tok.decode(tok(" ".join(words), add_special_tokens=False)["input_ids"]) == " ".join(words)
    assert manifest.tokens > 20 * manifest.sequences


# ----------------------------------------------------------------------------------- atomic builds


def test_rebuild_is_a_no_op(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["10%"])
    manifest, out = build(study, nodes["10%"], tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again, _ = build(study, nodes["10%"], tmp_path)
    assert again == manifest == read_manifest(out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    assert json.loads((out / "manifest.json").read_text())["node_id"] == nodes["10%"].id


def test_a_killed_build_does_not_count_as_finished_and_is_completed(tmp_path, base_spec):
    """Killed after its first row group: no manifest, so absent; the next build completes it (by
    resuming it: tests/test_corpus.py::test_a_killed_build_resumes_from_its_last_closed_shard)."""
    study, nodes = make_study(tmp_path, base_spec, ["100%"])
    node, out = nodes["100%"], tmp_path / "builds" / nodes["100%"].id
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
from scaling_study import corpus
from scaling_study.grid import expand
from scaling_study.spec import load_spec
flush = corpus._ShardWriter._flush
def die(self):
    flush(self)
    os.kill(os.getpid(), signal.SIGKILL)   # killed after writing the first shard
corpus._ShardWriter._flush = die
study = load_spec({str(tmp_path / "spec.yaml")!r})
node = next(n for n in expand(study).of_kind("corpus"))
corpus.build_corpus(study, node, {str(out)!r}, progress=False, shard_sequences=50)
"""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(base_spec))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    partial = list(out.parent.glob(f".{out.name}.partial-*"))
    assert len(partial) == 1 and list((partial[0] / "shards").glob("*.parquet"))
    assert not out.exists() and read_manifest(out) is None

    manifest = build_corpus(study, node, out, progress=False)
    assert read_manifest(out) == manifest and manifest.node_id == node.id
    assert not list(out.parent.glob(f".{out.name}.partial-*"))  # the dead build's folder is gone


def test_leftover_folder_without_manifest_is_replaced(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["10%"])
    out = tmp_path / "builds" / nodes["10%"].id
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard-00000.parquet").write_bytes(b"half")
    assert read_manifest(out) is None
    manifest, _ = build(study, nodes["10%"], tmp_path)
    assert read_manifest(out) == manifest and rows(out).shape[0] == manifest.sequences


def test_a_folder_of_another_node_is_refused(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["10%", "100%"])
    manifest, out = build(study, nodes["10%"], tmp_path)
    with pytest.raises(UserError, match=nodes["10%"].id):
        build_corpus(study, nodes["100%"], out, progress=False)


def test_progress_can_be_switched_off(tmp_path, base_spec, capfd):
    study, nodes = make_study(tmp_path, base_spec, ["10%"])
    build_corpus(study, nodes["10%"], tmp_path / "quiet", progress=False)
    assert capfd.readouterr().err == ""
    build_corpus(study, nodes["10%"], tmp_path / "loud", progress=True)
    assert "pack" in capfd.readouterr().err


# ----------------------------------------------------------------------------------- sources


def test_folders_env_and_file_urls(tmp_path, base_spec, monkeypatch):
    docs = synthetic_docs(300)
    data = tmp_path / "data"
    data.mkdir()
    (data / "b.txt").write_text("\n".join(docs[100:200]) + "\n")
    (data / "a.txt").write_text("\n".join(docs[:100]) + "\n")
    (data / "notes.md").write_text("not corpus text\n")
    (tmp_path / "c.txt").write_text("\n".join(docs[200:]) + "\n")
    monkeypatch.setenv("TOY_CORPUS", str(data))
    study, nodes = make_study(tmp_path, base_spec, ["100%"], write=False,
                              paths=["${TOY_CORPUS:-missing}"], urls=[(tmp_path / "c.txt").as_uri()])
    cache = tmp_path / "cache"
    assert [f.path for f in input_files(study, cache_dir=cache, download=False)][:2] == \
        [str(data / "a.txt"), str(data / "b.txt")]
    manifest, out = build(study, nodes["100%"], tmp_path, cache_dir=cache)
    assert manifest.documents == 300 and markers(out, manifest) == {f"d{i:04d}" for i in range(300)}
    assert [Path(f["path"]).name for f in manifest.input_files][:2] == ["a.txt", "b.txt"]
    assert manifest.input_files[2]["url"] == (tmp_path / "c.txt").as_uri()
    assert input_files(study, cache_dir=cache, download=False)[2].path == manifest.input_files[2]["path"]


def test_http_url_is_downloaded_once_into_the_cache(tmp_path, base_spec, monkeypatch):
    served = tmp_path / "www"
    served.mkdir()
    (served / "corpus.txt").write_text("\n".join(synthetic_docs(200)) + "\n")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/corpus.txt"
        study, nodes = make_study(tmp_path, base_spec, ["10%", "100%"], write=False, paths=[], urls=[url])
        # conftest sets SCALING_STUDY_OFFLINE=1: refused with one line naming the URL, nothing fetched
        with pytest.raises(UserError, match=r"corpus\.urls\[0\]: not downloaded: \$SCALING_STUDY_OFFLINE=1; got "
                                            rf"'{re.escape(url)}'; allowed: unset SCALING_STUDY_OFFLINE") as offline:
            build(study, nodes["10%"], tmp_path)
        assert "\n" not in str(offline.value) and requests == []
        monkeypatch.delenv("SCALING_STUDY_OFFLINE")
        for label in ("10%", "100%"):
            manifest, out = build(study, nodes[label], tmp_path)
        assert manifest.documents == 200 and requests == ["/corpus.txt"]
        assert list((out.parent / "cache").glob("*corpus.txt"))
        bad = url.replace("corpus.txt", "missing.txt")
        study, nodes = make_study(tmp_path, base_spec, ["100%"], write=False, paths=[], urls=[bad])
        with pytest.raises(UserError, match=r"corpus\.urls\[0\].*cannot download"):
            build(study, nodes["100%"], tmp_path)
    finally:
        server.shutdown()


def test_the_offline_switch_covers_model_downloads():
    code = "import os, scaling_study; print(os.environ.get('HF_HUB_OFFLINE'))"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    seen = [subprocess.run([sys.executable, "-c", code], env={**env, "SCALING_STUDY_OFFLINE": value}, cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.strip() for value in ("1", "0")]
    assert seen == ["1", "None"]


# ----------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["100%"], write=False, paths=["nowhere.txt"])
    with pytest.raises(UserError, match=r"spec\.yaml: corpus\.paths\[0\]: no such file or folder: .*nowhere\.txt"):
        build(study, nodes["100%"], tmp_path)
    with pytest.raises(UserError, match="nowhere"):
        input_files(study, cache_dir=tmp_path / "cache", download=False)


def test_folder_without_text_files(tmp_path, base_spec):
    (tmp_path / "empty").mkdir()
    study, nodes = make_study(tmp_path, base_spec, ["100%"], write=False, paths=["empty"])
    with pytest.raises(UserError, match=r"holds no \*\.txt file"):
        build(study, nodes["100%"], tmp_path)


def test_empty_corpus(tmp_path, base_spec):
    (tmp_path / "corpus.txt").write_text("\n  \n\n")
    study, nodes = make_study(tmp_path, base_spec, ["100%"], write=False)
    with pytest.raises(UserError, match=r"corpus\.txt: corpus 'toy' has no documents"):
        build(study, nodes["100%"], tmp_path)


def test_bad_utf8_names_file_and_line(tmp_path, base_spec):
    docs = synthetic_docs(50)
    (tmp_path / "corpus.txt").write_bytes("\n".join(docs[:41]).encode() + b"\nbad \xff byte\n" + docs[45].encode())
    study, nodes = make_study(tmp_path, base_spec, ["100%"], write=False)
    with pytest.raises(UserError, match=r"corpus\.txt:42: not UTF-8 \(byte 0xff at byte 5"):
        build(study, nodes["100%"], tmp_path)
    assert not list((tmp_path / "builds").iterdir())  # nothing left behind


def test_empty_subset(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["0.01%"], docs=synthetic_docs(100))
    assert not expected_markers(0, 0.0001, 100)
    with pytest.raises(UserError, match=r"data volume 0\.01% selects none of the 100 documents.*allowed"):
        build(study, nodes["0.01%"], tmp_path)


def test_too_few_tokens(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["1M"], docs=synthetic_docs(20))
    with pytest.raises(UserError, match=r"1M tokens is more than the corpus's [\d,]+ tokens"):
        build(study, nodes["1M tokens"], tmp_path)
    study, nodes = make_study(tmp_path, base_spec, ["100%"], docs=["only a few words"])
    with pytest.raises(UserError, match="less than one sequence"):
        build(study, nodes["100%"], tmp_path)


def test_document_key_is_uniform_and_stable():
    keys = np.array([document_key(0, d) / 2**64 for d in synthetic_docs(20_000)])
    assert 0 <= keys.min() and keys.max() < 1 and abs(keys.mean() - 0.5) < 0.01
    assert document_key(0, "a b") == document_key(0, "a b") != document_key(1, "a b") != document_key(0, "a c")
    assert (document_key(0, "x"), document_key(3, "Protein binds DNA")) == PINNED_KEYS
    assert wordpiece.SPECIAL_TOKENS == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


PINNED_KEYS = (0xFFEB36BF5993A69C, 0x49DCFF7835F7C264)  # blake2b-64 of b"<seed>:<utf-8 text>", little-endian


# ----------------------------------------------------------------------------------- tokenizer samples


def test_a_bounded_sample_is_the_volumes_smallest_keys_and_nests(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["10%", "50%", "100%"], tokenizer_sample=4_000)
    labels = ["10%", "50%", "100%"]
    manifests = build_corpora(study, [nodes[v] for v in labels], [tmp_path / v for v in labels], progress=False)
    small, half, whole = manifests
    assert small.tokenizer_documents < small.documents  # the sample is smaller than the volume
    # the smallest keys of the corpus, whole key buckets, lie inside the 10% volume: one sample for all
    assert small.tokenizer_documents == half.tokenizer_documents == whole.tokenizer_documents
    assert small.tokenizer_hash == half.tokenizer_hash == whole.tokenizer_hash
    assert 4_000 <= small.tokenizer_chars < 4_000 + 2_000  # at most one bucket's documents over


def test_a_sample_that_could_wrap_the_pair_counts_is_refused(tmp_path, base_spec):
    study, nodes = make_study(tmp_path, base_spec, ["100%"])
    with pytest.raises(UserError, match=r"tokenizer sample of data volume 100% holds [\d,]+ characters, more than "
                                        r"the WordPiece trainer's 32-bit pair counts can hold \(10,000\); allowed: "
                                        r"corpus\.tokenizer_sample below 10,000 bytes"):
        build(study, nodes["100%"], tmp_path, pair_limit=10_000)
    assert not list((tmp_path / "builds").iterdir())
    manifest, _ = build(study, nodes["100%"], tmp_path)  # the real bound: 2**31 - 1
    assert manifest.tokenizer_chars < wordpiece.PAIR_COUNT_LIMIT == 2**31 - 1


def test_keys_depend_on_the_document_alone(tmp_path, base_spec):
    """The same documents as JSONL, compressed, split over two files: the same subset and tokenizer."""
    import gzip

    study, nodes = make_study(tmp_path, base_spec, ["10%"])
    text, out_text = build(study, nodes["10%"], tmp_path / "text")
    docs = synthetic_docs()
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs[500:]))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs[:500]))
    study, nodes = make_study(tmp_path, base_spec, ["10%"], write=False, paths=["a.jsonl.gz", "b.jsonl.gz"],
                              format="jsonl")
    jsonl, out_jsonl = build(study, nodes["10%"], tmp_path / "jsonl")
    assert jsonl.tokenizer_hash == text.tokenizer_hash and jsonl.documents == text.documents
    assert markers(out_jsonl, jsonl) == markers(out_text, text) == expected_markers(0, 0.1)


def test_a_corpus_on_s3_builds_what_its_local_copy_builds(tmp_path, base_spec, s3_server):
    """Documents read in place from an object-store prefix (moto's S3 server): the same subset,
    tokenizer and rows as the same files on disk."""
    study, nodes = make_study(tmp_path, base_spec, ["10%"])
    local, out_local = build(study, nodes["10%"], tmp_path / "local")
    bucket = s3_server.bucket()
    s3_server.client.upload_file(str(tmp_path / "corpus.txt"), bucket[len("s3://"):], "corpus/part-0.txt")
    study, nodes = make_study(tmp_path, base_spec, ["10%"], write=False, paths=[f"{bucket}/corpus/"])
    remote, out_remote = build(study, nodes["10%"], tmp_path / "s3")
    assert remote.input_files[0]["path"] == f"{bucket}/corpus/part-0.txt"
    assert (remote.tokenizer_hash, remote.documents, remote.tokens) == (local.tokenizer_hash, local.documents,
                                                                        local.tokens)
    assert (rows(out_remote) == rows(out_local)).all()


KILL_AT_A_CLOSED_SHARD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from scaling_study import corpus
from scaling_study.grid import expand
from scaling_study.spec import load_spec
checkpoint, closed = corpus._Build._checkpoint, []
def die(self, tmp, state, writer):
    checkpoint(self, tmp, state, writer)
    closed.append(tmp)
    if len(set(closed)) == 2 and min(map(closed.count, set(closed))) == 2:
        os.kill(os.getpid(), signal.SIGKILL)   # killed right after a shard closed and was saved
corpus._Build._checkpoint = die
study = load_spec({spec!r})
nodes = list(expand(study).of_kind("corpus"))
corpus.build_corpora(study, nodes, [{root!r} + "/" + n.id for n in nodes], progress=False, **{options!r})
"""


def test_a_killed_build_resumes_from_its_last_closed_shard(tmp_path, base_spec, monkeypatch, capfd):
    """Killed in the pack pass: the next build of the same nodes packs only the pieces from the
    one its last closed shard stopped in, skips the scan and the training, and writes the same
    shards, tokenizers and manifests as a build that was never killed."""
    import shutil

    study, nodes = make_study(tmp_path, base_spec, ["10%", "100%"])
    nodes = [nodes["10%"], nodes["100%"]]
    options = {"piece_bytes": 20_000, "shard_sequences": 50, "min_shards": 1}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(base_spec))
    killed = tmp_path / "killed"
    script = KILL_AT_A_CLOSED_SHARD.format(repo=str(REPO), spec=str(tmp_path / "spec.yaml"), root=str(killed),
                                           options=options)  # once both volumes have closed 2 shards
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partials = sorted(killed.glob(".*.partial-*"))
    assert len(partials) == 2 and all((p / "build-state.json").is_file() for p in partials)
    broken = tmp_path / "broken"  # the same folders with a closed shard lost: nothing to resume
    for p in partials:
        shutil.copytree(p, broken / p.name)
    states = {p.name: json.loads((p / "build-state.json").read_text()) for p in partials}
    name, state = max(states.items(), key=lambda item: item[1]["pack"]["closed"])
    (broken / name / "shards" / "shard-00000.parquet").unlink()

    clean = build_corpora(study, nodes, [tmp_path / "clean" / n.id for n in nodes], progress=False, **options)
    pack_piece, packed, skipped = corpus_mod.pack_piece, [], []

    def spy(piece, **kw):  # which pieces are packed, and whether a volume past a piece skips it
        out = pack_piece(piece, **kw)
        packed.append(piece)
        skipped.extend(len(part.rows) == 0 for part, start in zip(out, kw["starts"]) if piece.index < start)
        return out
    monkeypatch.setattr(corpus_mod, "pack_piece", spy)
    scan = corpus_mod._Build.scan
    monkeypatch.setattr(corpus_mod._Build, "scan", lambda self: pytest.fail("a resumed build scanned again"))
    resumed = build_corpora(study, nodes, [killed / n.id for n in nodes], progress=False, **options)
    assert "resuming a killed build at piece" in capfd.readouterr().err
    assert 0 < len(packed) < clean[0].pieces  # only the pieces from the last closed shard's on
    assert min(s["pack"]["piece"] for s in states.values()) > 0
    assert skipped and all(skipped)  # the 100% volume, further on than the 10% one, is not tokenized again

    def same(m):
        return {k: v for k, v in vars(m).items() if k not in ("created", "build_seconds", "stage_seconds")}
    for n, a, b in zip(nodes, clean, resumed):
        assert same(a) == same(b)
        assert read_manifest(killed / n.id).files == read_manifest(tmp_path / "clean" / n.id).files
        assert (rows(tmp_path / "clean" / n.id) == rows(killed / n.id)).all()
        listing = sorted(str(p.relative_to(killed / n.id)) for p in (killed / n.id).rglob("*"))
        assert listing == sorted(str(p.relative_to(tmp_path / "clean" / n.id))
                                 for p in (tmp_path / "clean" / n.id).rglob("*"))
        assert (killed / n.id / "tokenizer" / "tokenizer.json").read_bytes() == \
            (tmp_path / "clean" / n.id / "tokenizer" / "tokenizer.json").read_bytes()
    assert not list(killed.glob(".*.partial-*"))

    monkeypatch.setattr(corpus_mod._Build, "scan", scan)
    packed.clear()
    again = build_corpora(study, nodes, [broken / n.id for n in nodes], progress=False, **options)
    assert len(packed) == clean[0].pieces and [same(m) for m in again] == [same(m) for m in clean]
    assert not list(broken.glob(".*.partial-*"))
