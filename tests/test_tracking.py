"""Tracking against a real local MLflow server (sqlite) on 127.0.0.1."""

import os

import pytest

from scaling_study import tracking
from scaling_study.tracking import LocalMlflowServer, Tracker, TrackingError, check_server, redact_uri


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LocalMlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv
    assert srv.process.poll() is not None, "server still running after stop"


def test_server_binds_loopback(server):
    assert server.uri.startswith("http://127.0.0.1:")
    check_server(server.uri)
    assert (server.root / "mlflow.db").exists()


def test_one_run_per_node(server):
    tracker = Tracker(server.uri, "idempotence")
    parent = tracker.run_for("pt-0001", kind="pretrain", name="tiny/1%", factors={"model_size": "tiny"})
    child = tracker.run_for("ck-0002", kind="checkpoint", name="tiny/1%/100",
                            factors={"model_size": "tiny", "steps": 100}, parent_run_id=parent)
    again = Tracker(server.uri, "idempotence")  # a new driver process would do this
    assert again.run_for("ck-0002", kind="checkpoint", name="x", parent_run_id=parent) == child
    run = again.client.get_run(child)
    assert run.data.tags["node_id"] == "ck-0002"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params == {"model_size": "tiny", "steps": "100"}
    assert len(again.search()) == 2


def test_search_follows_pages(server, monkeypatch):
    monkeypatch.setattr(tracking, "PAGE", 7)
    tracker = Tracker(server.uri, "pages")
    for i in range(23):
        tracker.run_for(f"ft-{i:04d}", kind="finetune", name=str(i))
    assert len(tracker.search()) == 23
    assert len({r.info.run_id for r in tracker.search()}) == 23
    assert len(tracker.search(max_results=10)) == 10


def test_duplicate_node_runs_are_an_error(server):
    tracker = Tracker(server.uri, "dupes")
    tracker.run_for("ft-dup", kind="finetune", name="a")
    tracker.client.create_run(tracker.experiment_id, tags={"node_id": "ft-dup"})  # bypassing run_for
    with pytest.raises(TrackingError, match="2 MLflow runs carry node id ft-dup"):
        tracker.find_run("ft-dup")


def test_down_server_is_a_clear_error(tmp_path):
    port = tracking._free_port("127.0.0.1")
    with pytest.raises(TrackingError) as info:
        Tracker(f"http://user:hunter2@127.0.0.1:{port}", "x")
    message = str(info.value)
    assert "is not reachable" in message and "hunter2" not in message and "user:***@" in message


def test_redact_uri():
    assert redact_uri("https://alice:s3cret@mlflow.example.org/") == "https://alice:***@mlflow.example.org/"
    assert redact_uri("http://h:5000/?token=abc&x=1") == "http://h:5000/?token=***&x=1"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


@pytest.mark.parametrize("uri,shown", [
    ("http://ghp_T0KEN@mlflow.example.org/", "http://***@mlflow.example.org/"),        # a token as user name
    ("https://alice:p@ss@w0rd@host:5000/x", "https://alice:***@host:5000/x"),         # raw @ in the password
    ("postgresql://u:a@b:c@db.internal/mlflow", "postgresql://u:***@db.internal/mlflow"),
    ("see http://bob:pw@h:1/ and mail a@b.org", "see http://bob:***@h:1/ and mail a@b.org"),
])
def test_redaction_hides_everything_before_the_authoritys_last_at(uri, shown):
    assert redact_uri(uri) == shown


def test_failed_start_reports_log(tmp_path):
    busy = LocalMlflowServer(tmp_path / "a", startup_timeout=30)
    os.makedirs(busy.root, exist_ok=True)
    (busy.root / "mlflow.db").write_text("not a database")
    with pytest.raises(TrackingError, match="local MLflow server"):
        busy.start()
    busy.stop()


@pytest.fixture
def not_http():
    """A listener on 127.0.0.1 that answers every connection with binary bytes, as a gRPC or Ray
    port would, and closes it."""
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\x00\x03\x7f\xff\xff\xff\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield sock.getsockname()[1]
    sock.close()


def test_a_port_that_is_not_http_is_a_clear_error(not_http):
    with pytest.raises(TrackingError, match="is not reachable .the reply is not HTTP"):
        check_server(f"http://127.0.0.1:{not_http}")


def test_a_chosen_port_taken_before_the_server_binds_it_is_chosen_again(tmp_path, monkeypatch, not_http):
    """The moment between choosing a free port and the server binding it: another process took it."""
    free = tracking._free_port
    offered = iter([not_http])
    monkeypatch.setattr(tracking, "_free_port", lambda host: next(offered, None) or free(host))
    server = LocalMlflowServer(tmp_path / "mlflow", startup_timeout=60).start(wait=False)
    try:
        assert server.port == not_http
        uri = server.wait_ready()
        assert uri == server.uri and server.port != not_http
        check_server(uri)
        assert "address already in use" in (tmp_path / "mlflow" / "server.log").read_text().lower()
    finally:
        server.stop()


def test_a_given_port_that_is_taken_is_an_error(tmp_path, not_http):
    server = LocalMlflowServer(tmp_path / "mlflow", port=not_http, startup_timeout=60)
    with pytest.raises(TrackingError, match="exited with code"):
        server.start()
    server.stop()
