"""The cluster: `ray_cluster*.yaml` through Ray's own validator, and `scaling-study submit` through the
Jobs API of a real `ray start --head` (token auth on) with a real MLflow server.

The end-to-end test submits a micro study (debug model, 300-line corpus, two tasks capped to a few
dozen examples, one checkpoint, one epoch level) from a spec outside the repository, so the spec
travels as text and every path in it is absolute, as it must be for a job whose working directory
is Ray's copy of the repository.
"""

import copy
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml

from scaling_study.cli import main
from scaling_study.spec import load_spec
from scaling_study.submit import EXCLUDES, SPEC_PATH_ENV, SPEC_TEXT_ENV, entrypoint_and_env, submission_id

from conftest import REPO, SHARED, micro_corpus, needs_mirror

CONFIGS = [REPO / "ray_cluster.yaml", REPO / "ray_cluster.local.yaml"]


def _validated(config: dict) -> dict:
    """What `ray up` does before it calls the cloud: fill in the provider's defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cluster_config_passes_rays_validator(path):
    config = yaml.safe_load(path.read_text())
    prepared = _validated(config)
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert config["docker"]["image"].endswith("-gpu")
    text = path.read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AWS_SECRET", "RAY_AUTH_TOKEN="):
        assert secret not in text
    head = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--disable-usage-stats" in head
    assert "RAY_AUTH_MODE=token" in " ".join(prepared["head_setup_commands"])  # read by the head's start
    assert "RAY_AUTH_MODE=token" in " ".join(prepared["worker_start_ray_commands"])
    assert "mlflow server --backend-store-uri" in head
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    bad = copy.deepcopy(config)
    bad["idle_timeout_minute"] = 5  # a typo must not pass: the check can fail
    with pytest.raises(Exception, match="idle_timeout_minute"):
        _validated(bad)


def test_aws_node_types():
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    assert types["gpu_pretrain"]["resources"]["GPU"] > 1
    assert "InstanceMarketOptions" not in types["gpu_pretrain"]["node_config"]
    assert types["gpu_finetune"]["resources"]["GPU"] == 1
    assert types["gpu_finetune"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    for node_type in types.values():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_aws_disks_hold_what_the_plan_stores_for_the_paper_grid():
    """Each node type's volume (GiB) against `plan`'s disk needs for experiments/scholarbert.yaml."""
    from scaling_study.costs import estimate
    from scaling_study.grid import expand

    study = load_spec(REPO / "experiments" / "scholarbert.yaml")
    needs = estimate(study, expand(study)).storage.node_disk
    types = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())["available_node_types"]
    for node_type, need in (("head", "head"), ("gpu_pretrain", "pretrain_node"), ("gpu_finetune", "finetune_node")):
        [volume] = types[node_type]["node_config"]["BlockDeviceMappings"]
        size = volume["Ebs"]["VolumeSize"] * 2**30
        assert size >= needs[need]["total"], (node_type, size / 2**30, needs[need]["total"] / 2**30)
    assert needs["head"]["corpus_shards"] > 900e9 and needs["pretrain_node"]["checkpoints"] > 100e9


def _spec(folder: Path, name: str = "clustered", **changes) -> Path:
    corpus = micro_corpus(folder)
    spec = {
        "name": name,
        "corpus": {"name": "sci", "paths": [str(corpus)], "vocab_size": 1500},
        "model_sizes": ["debug"],
        "data_volumes": ["100%"],
        "pretrain": {"steps": [10], "batch_size": 8, "seq_len": 64, "precision": "fp32", "lr": 1e-3,
                     "log_every": 5},
        "finetune": {"epochs": [1], "seeds": [0], "lr": 1e-3, "batch_size": 16, "max_seq_len": 64},
        "tasks": {"include": ["bc5cdr_ner", "scierc_re"], "max_train_examples": 32, "max_dev_examples": 16,
                  "max_test_examples": 16, "data_dir": str(SHARED / "datasets")},
        "storage": {"root": str(folder / "studies")},
        **changes,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


needs_data = needs_mirror("datasets")


@needs_data
def test_submission_id_follows_the_study(tmp_path):
    path = _spec(tmp_path)
    study = load_spec(path)
    first = submission_id(study)
    assert first.startswith("scaling-study-clustered-")
    assert submission_id(study, tracking_uri="http://elsewhere:5000") != first
    path.write_text("# a comment and reordered keys change nothing\n"
                    + yaml.safe_dump(yaml.safe_load(path.read_text()), sort_keys=True))
    assert submission_id(load_spec(path)) == first
    data = yaml.safe_load(path.read_text())
    data["finetune"]["lr"] = 2e-3
    path.write_text(yaml.safe_dump(data))
    assert submission_id(load_spec(path)) != first


@needs_data
def test_entrypoint_ships_the_spec_beside_where_it_was(tmp_path):
    inside = load_spec(REPO / "experiments" / "smoke.yaml")
    entry, env = entrypoint_and_env(inside, REPO)
    assert env[SPEC_TEXT_ENV] == (REPO / "experiments" / "smoke.yaml").read_text()  # comments and all
    assert env[SPEC_PATH_ENV] == "experiments/.smoke.submitted.yaml"  # relative paths resolve as before
    assert entry.startswith('W="$PWD" && python -m scaling_study.submit && ')
    assert entry.endswith('scaling-study run "$W/experiments/.smoke.submitted.yaml" --quiet')
    assert "cd \"${SCALING_STUDY_HOME:-$HOME/scaling-study}\"" in entry
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and "MLFLOW_TRACKING_URI" not in env

    outside = load_spec(_spec(tmp_path))
    entry, env = entrypoint_and_env(outside, REPO, tracking_uri="${MLFLOW_TRACKING_URI}")
    shipped = yaml.safe_load(env[SPEC_TEXT_ENV])
    assert shipped["tracking"]["uri"] == "${MLFLOW_TRACKING_URI}"
    assert shipped["corpus"] == yaml.safe_load((tmp_path / "clustered.yaml").read_text())["corpus"]
    assert env[SPEC_PATH_ENV] == ".scaling-study/.clustered.submitted.yaml"
    assert {".git", ".venv", "data", "studies", "outputs"} <= set(EXCLUDES)
    entry, _ = entrypoint_and_env(outside, REPO, extend=True)  # `submit --extend`: the job's run extends
    assert entry.endswith('scaling-study run "$W/.scaling-study/.clustered.submitted.yaml" --quiet --extend')


def test_attempt_numbers():
    """Retries of a study are `<id>-2`, `-3`, ...; other studies' ids (even with the same prefix) are not its attempts."""
    from types import SimpleNamespace

    from scaling_study.submit import _attempt

    base = "scaling-study-x-0123456789ab"
    ids = {base: 1, f"{base}-2": 2, f"{base}-10": 10, f"{base}x": 0, f"{base}-2b": 0, "scaling-study-y-1": 0}
    for sid, number in ids.items():
        assert _attempt(SimpleNamespace(submission_id=sid), base) == number, sid


def _wait(client, job_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status} after {timeout:.0f} s:\n{client.get_job_logs(job_id)[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A local MLflow server, started in a thread so that it comes up while the Ray head does."""
    import threading

    from scaling_study.tracking import LocalMlflowServer

    server = LocalMlflowServer(tmp_path_factory.mktemp("mlflow"))
    failed: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as exc:  # re-raised in the test's thread
            failed.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()

    def ready() -> LocalMlflowServer:
        thread.join()
        if failed:
            raise failed[0]
        return server

    try:
        yield ready
    finally:
        thread.join()
        server.stop()


@pytest.mark.slow
@needs_data
def test_submit_runs_the_study_once(mlflow_server, ray_head, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from scaling_study.submit import connect
    from scaling_study.tracking import KIND_TAG

    # token auth is on: a request without the token is refused, the CLI's (from RAY_AUTH_TOKEN) is not
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["status", "--address", ray_head.dashboard_url]) == 2
    assert "refused the request" in capsys.readouterr().err
    # the head's auth settings for this process, and Ray's cached config re-read on the way out: a later
    # test's local Ray must not inherit token auth (its workers could not reach this driver)
    with ray_head.in_this_process():
        server = mlflow_server()
        path = _spec(tmp_path, tracking={"uri": server.uri})
        assert main(["submit", str(path), "--address", ray_head.dashboard_url]) == 0
        job_id = submission_id(load_spec(path))
        assert f"submitted {job_id}" in capsys.readouterr().out
        # again while it is pending or running: attaches
        assert main(["submit", str(path), "--address", ray_head.dashboard_url]) == 0
        out = capsys.readouterr().out
        assert f"already submitted: {job_id} (PENDING)" in out or f"already submitted: {job_id} (RUNNING)" in out
        client = connect(ray_head.dashboard_url)
        status = _wait(client, job_id)
        assert status == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]

        mlflow = MlflowClient(server.uri)
        experiment = mlflow.get_experiment_by_name("clustered")
        runs = mlflow.search_runs([experiment.experiment_id])
        kinds = sorted(r.data.tags[KIND_TAG] for r in runs)
        assert kinds == ["corpus", "finetune", "finetune", "pretrain", "study"]
        assert all(r.info.status == "FINISHED" for r in runs)

        # the same study again: attaches to the finished job, starts nothing
        assert main(["submit", str(path), "--address", ray_head.dashboard_url, "--follow"]) == 0
        out = capsys.readouterr().out
        assert f"already submitted: {job_id} (SUCCEEDED)" in out and f"{job_id}: SUCCEEDED" in out
        assert [j.submission_id for j in client.list_jobs()] == [job_id]
        assert len(mlflow.search_runs([experiment.experiment_id])) == len(runs)

        assert main(["status", "--address", ray_head.dashboard_url]) == 0
        out = capsys.readouterr().out
        assert job_id in out and "SUCCEEDED" in out and "clustered" in out
        assert main(["status", str(path), "--address", ray_head.dashboard_url]) == 0
        assert job_id in capsys.readouterr().out
        assert main(["status", "other-study", "--address", ray_head.dashboard_url]) == 0
        assert "no study jobs of other-study" in capsys.readouterr().out
        assert main(["status", "clustered", "--tracking-uri", server.uri]) == 0  # MLflow runs, as before
        out = capsys.readouterr().out
        assert "finetune" in out and "FINISHED" in out
