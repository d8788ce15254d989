"""Storage roots (scaling_study.storage) on fsspec's in-memory filesystem, on file:// URIs and on a
real S3-compatible server (moto's, on 127.0.0.1; conftest's `s3_server`).

The end-to-end run of a study on a `file://` root is in tests/test_dashboards.py (it shares the
Ray head and the study run with the dashboard metrics test).
"""

import uuid

import pytest
import yaml

from scaling_study import artifacts, storage
from scaling_study.errors import SpecErrors, UserError
from scaling_study.storage import Store, check_root, local_copy


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_STUDY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(params=["memory", "file", "s3"])
def store(request, tmp_path):
    if request.param == "memory":  # fsspec's, through pyarrow's FSSpecHandler; one namespace per process
        return Store(f"memory://bucket-{uuid.uuid4().hex[:8]}/studies/x")
    if request.param == "s3":  # pyarrow's S3 client against moto's server, found through $AWS_ENDPOINT_URL
        return Store(f"{request.getfixturevalue('s3_server').bucket()}/studies/x")
    return Store(f"file://{tmp_path}/bucket/studies/x")


def _folder(store: Store, rel: str) -> None:
    (store.local / rel / "sub").mkdir(parents=True)
    (store.local / rel / "weights.bin").write_bytes(b"w" * 1000)
    (store.local / rel / "sub" / "config.json").write_text("{}")
    (store.local / rel / "MARKER").write_text("done")


def test_plain_path_is_used_in_place(tmp_path):
    s = Store(tmp_path / "root")
    assert not s.remote and s.local == tmp_path / "root" and s.url("a/b") == str(tmp_path / "root" / "a" / "b")
    (s.local / "a").mkdir(parents=True)
    (s.local / "a" / "f").write_text("x")
    s.upload("a", last=("f",))  # nothing to do
    assert s.download("a") == s.local / "a"
    assert local_copy(str(s.local / "a")) == str(s.local / "a")
    assert local_copy("allenai/scibert_scivocab_cased") == "allenai/scibert_scivocab_cased"  # a hub id


def test_uri_maps_to_a_mirror_in_the_cache(cache, store):
    assert store.remote and store.local.is_relative_to(cache / "mirror")
    assert store.child("pretrain/pt-1").url("checkpoints") == store.location + "/pretrain/pt-1/checkpoints"
    import pickle

    assert pickle.loads(pickle.dumps(store)).location == store.location


def test_small_files(store):
    assert store.read_text("nothing.json") is None and not store.exists("nothing.json")
    store.write_text("a/final.json", '{"x": 1}')
    assert store.read_text("a/final.json") == '{"x": 1}' and store.is_file("a/final.json")
    assert not store.is_file("a") and store.exists("a") and store.list("a") == ["final.json"]
    store.append_text("logs/n.log", "one\n")
    store.append_text("logs/n.log", "two\n")
    assert store.read_text("logs/n.log") == "one\ntwo\n"
    store.delete("a")
    assert not store.exists("a/final.json") and store.list("") == ["logs"]


def test_folder_round_trip_with_exclusions(store, cache, tmp_path):
    _folder(store, "ck")
    store.upload("ck", last=("MARKER",))
    assert store.list("ck") == ["MARKER", "sub", "weights.bin"]
    elsewhere = Store(store.location)  # another machine: an empty cache
    import shutil

    shutil.rmtree(store.local)
    got = elsewhere.download("ck", exclude=("weights.bin",))
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == ["MARKER", "sub/config.json"]
    assert not list((cache / ".tmp").iterdir())  # temporary download files renamed or removed


def test_a_killed_upload_leaves_no_marker(store, monkeypatch):
    """The marker goes up last: an upload that dies on the way leaves a folder readers ignore."""
    _folder(store, "ck")
    calls = []
    real = Store._put

    def failing(self, source, dest):
        calls.append(source.name)
        if len(calls) == 2:
            raise OSError("connection reset (injected)")
        real(self, source, dest)

    monkeypatch.setattr(Store, "_put", failing)
    with pytest.raises(OSError, match="injected"):
        store.upload("ck", last=("MARKER",))
    assert not store.exists("ck/MARKER")
    monkeypatch.setattr(Store, "_put", real)
    store.upload("ck", last=("MARKER",))
    assert store.is_file("ck/MARKER")


def test_a_killed_download_leaves_no_marker(store, monkeypatch):
    import pyarrow.fs as pafs

    _folder(store, "ck")
    store.upload("ck", last=("MARKER",))
    import shutil

    shutil.rmtree(store.local)
    real = pafs.copy_files
    fetched = []

    def failing(source, dest, **kw):
        fetched.append(source.rsplit("/", 1)[1])
        if fetched[-1] == "MARKER":
            raise OSError("connection reset (injected)")
        return real(source, dest, **kw)

    monkeypatch.setattr(storage.pafs, "copy_files", failing)
    with pytest.raises(OSError, match="injected"):
        store.download("ck", last=("MARKER",))
    assert fetched[-1] == "MARKER" and len(fetched) == 3  # the marker last
    assert (store.local / "ck" / "weights.bin").is_file() and not (store.local / "ck" / "MARKER").exists()
    monkeypatch.setattr(storage.pafs, "copy_files", real)
    fetched.clear()
    store.download("ck", last=("MARKER",))
    assert (store.local / "ck" / "MARKER").read_text() == "done"


def test_checkpoints_go_up_and_the_latest_comes_down(store):
    from scaling_study.artifacts import STATE_FILE, checkpoint_dir

    def save(step, kind):
        folder = checkpoint_dir(store.local, step, kind=kind)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"m" * 100)
        (folder / STATE_FILE).write_bytes(b"s" * 10)
        artifacts.push_checkpoint(store, folder)

    save(5, "resume")
    save(10, "checkpoints")  # drops the stored resume-only step 5
    save(15, "resume")
    assert store.list("resume") == ["step-00000015"] and store.list("checkpoints") == ["step-00000010"]
    import shutil

    shutil.rmtree(store.local)
    store.write_text("resume/step-00000020/model.safetensors", "partial")  # no marker: not a checkpoint
    latest = artifacts.pull_latest_checkpoint(store)
    assert latest == store.local / "resume" / "step-00000015" and (latest / STATE_FILE).is_file()
    never_uploaded = checkpoint_dir(store.local, 18, kind="resume")  # its upload failed: other nodes lack it
    never_uploaded.mkdir(parents=True)
    (never_uploaded / STATE_FILE).write_bytes(b"s")
    assert artifacts.pull_latest_checkpoint(store) == latest and not never_uploaded.exists()


@pytest.mark.parametrize("root, problem", [
    ("studies", None), ("/abs/studies", None), ("s3://bucket/prefix", None), ("gs://bucket", None),
    ("file:///tmp/studies", None), ("ftp://host/x", "unsupported URI scheme 'ftp'"),
    ("s3://", "no bucket in the URI"), ("file://relative/x", "absolute path")])
def test_check_root(root, problem):
    found = check_root(root)
    assert (found is None) if problem is None else (problem in found)


def test_spec_rejects_an_unknown_scheme_in_one_line(tmp_path, base_spec):
    from scaling_study.spec import load_spec

    (tmp_path / "corpus.txt").write_text("a b c\n")
    base_spec["storage"] = {"root": "ftp://host/studies"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base_spec, sort_keys=False))
    with pytest.raises(SpecErrors) as err:
        load_spec(path)
    (line,) = str(err.value).splitlines()
    assert "storage.root" in line and "ftp" in line and "s3://" in line and "gs://" in line and "file://" in line
    base_spec["storage"] = {"root": "s3://bucket/studies"}
    path.write_text(yaml.safe_dump(base_spec, sort_keys=False))
    assert load_spec(path).spec.storage.root == "s3://bucket/studies"


def test_layout_of_a_uri_root(tmp_path, base_spec, cache):
    from scaling_study.artifacts import Layout
    from scaling_study.spec import load_spec

    (tmp_path / "corpus.txt").write_text("a b c\n")
    base_spec["storage"] = {"root": "s3://bucket/studies/"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base_spec, sort_keys=False))
    layout = Layout.of(load_spec(path))
    assert layout.store.location == "s3://bucket/studies/unit"
    assert layout.root == cache / "mirror" / "s3" / "bucket" / "studies" / "unit"
    assert layout.log("pt-1") == "s3://bucket/studies/unit/logs/pt-1.log"
    named = Layout.named("unit", "s3://bucket/studies/")  # `results unit --root s3://bucket/studies/`
    assert (named.root, named.store.location) == (layout.root, layout.store.location)
    base_spec["storage"] = {"root": str(tmp_path / "local")}
    path.write_text(yaml.safe_dump(base_spec, sort_keys=False))
    layout = Layout.of(load_spec(path))
    assert not layout.store.remote and layout.root == tmp_path / "local" / "unit"
    assert Layout.named("unit", str(tmp_path / "local")).root == layout.root
    with pytest.raises(UserError) as err:
        Layout.named("unit", "ftp://host/x")
    assert str(err.value).startswith("--root: unsupported URI scheme 'ftp'; got 'ftp://host/x'; allowed: ")


def test_the_tracking_database_goes_up_and_comes_down(s3_server, cache, tmp_path, monkeypatch):
    """The embedded MLflow db of an object-store root: uploaded when the driver ends, downloaded by
    another machine, again when storage holds a newer one, never over this machine's own."""
    from scaling_study.artifacts import Layout, pull_tracking, push_tracking

    root = f"{s3_server.bucket()}/studies"
    here = Layout.named("t", root)
    assert pull_tracking(here) == here.mlflow and not (here.mlflow / "mlflow.db").exists()  # nothing stored yet
    (here.mlflow).mkdir(parents=True)
    (here.mlflow / "mlflow.db").write_bytes(b"v1")
    assert pull_tracking(here) == here.mlflow and (here.mlflow / "mlflow.db").read_bytes() == b"v1"
    push_tracking(here)
    assert s3_server.keys(root.rsplit("/", 1)[0], "studies/t/") == ["studies/t/mlflow/mlflow.db"]

    monkeypatch.setenv("SCALING_STUDY_CACHE", str(tmp_path / "laptop"))
    there = Layout.named("t", root)
    assert there.root != here.root and (pull_tracking(there) / "mlflow.db").read_bytes() == b"v1"
    (here.mlflow / "mlflow.db").write_bytes(b"v2 (more runs)")  # the driver ran again, on its machine
    push_tracking(here)
    assert (pull_tracking(there) / "mlflow.db").read_bytes() == b"v2 (more runs)"
    monkeypatch.setenv("SCALING_STUDY_CACHE", str(cache))
    (here.mlflow / "mlflow.db").write_bytes(b"v3, not uploaded yet")  # a driver killed before its upload
    assert (pull_tracking(here) / "mlflow.db").read_bytes() == b"v3, not uploaded yet"


def test_an_object_store_data_dir_reaches_this_machine_task_by_task(s3_server, tmp_path, base_spec, cache):
    from scaling_study.spec import load_spec
    from scaling_study.storage import Store
    from scaling_study.tasks.data import mirror_dirs

    bucket = s3_server.bucket()
    for task in ("scierc_re", "bc5cdr_ner"):
        s3_server.client.put_object(Bucket=bucket[5:], Key=f"tasks/{task}/train.txt", Body=b"x")
    (tmp_path / "corpus.txt").write_text("a b c\n")
    base_spec["tasks"]["data_dir"] = f"{bucket}/tasks"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(base_spec, sort_keys=False))
    study = load_spec(path)
    mirror = Store(f"{bucket}/tasks").local
    assert mirror_dirs(study=study, tasks=["scierc_re"]) == [mirror]
    assert sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*") if p.is_file()) == ["scierc_re/train.txt"]
    mirror_dirs(study=study)  # every task of the study; paper_field_cls is not stored: left to the next places
    assert sorted(p.parent.name for p in mirror.rglob("train.txt")) == ["bc5cdr_ner", "scierc_re"]


def test_progress_outside_ray_is_silent(capsys, recwarn):
    """Plain train_mlm (no Ray): the throughput logger passes metrics on and exports nothing."""
    from scaling_study.pretrain import MemoryLogger
    from scaling_study.progress import gauge, throughput_logger

    logger = throughput_logger("s", "pt-1", MemoryLogger)
    logger.log_metrics({"tokens_per_s": 100.0, "mfu": 0.3, "loss": 7.0}, 5)
    assert gauge("scaling_study_mfu") is None
    assert logger.inner.history == [{"step": 5, "tokens_per_s": 100.0, "mfu": 0.3, "loss": 7.0}]
    assert capsys.readouterr() == ("", "") and not recwarn.list
