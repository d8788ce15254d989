"""Submit a study to a Ray cluster as a Ray job (the Jobs API), idempotently, and watch it.

    scaling-study submit experiments/scholarbert.yaml --address http://127.0.0.1:8265 --follow
    scaling-study status --address http://127.0.0.1:8265                 # every study job on the cluster
    scaling-study status scholarbert --address http://127.0.0.1:8265     # one study's attempts

    from scaling_study.submit import connect, submit, study_jobs
    client = connect("http://127.0.0.1:8265")
    job = submit(client, load_spec("experiments/smoke.yaml"))   # Submitted(submission_id, status, new)
    study_jobs(client, "smoke")

The submission id is derived from the study: its validated spec, its plan's node ids and the
tracking URI it logs to (`scaling-study-<name>-<12 hex>`). Submitting the same study again attaches
to the job that already exists, running or finished, instead of starting a second driver on the
same storage; a changed spec gets a new id. A failed or stopped job is retried only with
`retry=True` (`--retry`), as attempt `<id>-2`, `-3`, ...; the study resumes from storage.

What travels: the working directory (this source checkout, without .git, .venv, data, studies and
outputs) becomes the job's working directory and is first on its PYTHONPATH, so the cluster runs
the code that was submitted. The spec travels as text in the job's environment and is written
where it sat relative to the working directory (`.scaling-study/` for a spec from elsewhere), so
its relative paths resolve as they did; `tracking_uri=` (`--tracking-uri`) replaces its
tracking.uri. The entrypoint is `scaling-study run SPEC --quiet`, started from a persistent folder
on the head node, `$SCALING_STUDY_HOME` (default `~/scaling-study`): a relative `storage.root` (the
default `studies`) and the embedded MLflow server of a spec without `tracking.uri` live there,
not in Ray's temporary copy of the working directory.

Token authentication (Ray 2.52+): with `RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH` set, the client
sends that token; otherwise Ray's own rule applies (`RAY_AUTH_MODE=token` and `~/.ray/auth_token`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Callable

from scaling_study._env import QUIET_ENV
from scaling_study.errors import UserError
from scaling_study.grid import canonical_json, expand
from scaling_study.spec import Study

EXCLUDES = [".git", ".venv", "venv", "data", "studies", "outputs", "__pycache__", "*.egg-info", ".pytest_cache",
            ".hypothesis", "build", "dist"]
"""Never uploaded with the working directory (Ray's gitignore-style patterns)."""
METADATA_KEY = "scaling_study"
SHIPPED_DIR = ".scaling-study"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/+-]+$")
SPEC_TEXT_ENV, SPEC_PATH_ENV = "SCALING_STUDY_SPEC_YAML", "SCALING_STUDY_SPEC_PATH"


@dataclasses.dataclass(frozen=True)
class Submitted:
    submission_id: str
    status: str
    new: bool
    """True when this call started the job; False when it attached to an existing one."""


def study_digest(study: Study, tracking_uri: str | None = None) -> str:
    """Hash of what makes a study itself: its validated spec, its plan's node ids, the tracking override."""
    payload = {"spec": dataclasses.asdict(study.spec), "plan": sorted(expand(study).nodes),
               "tracking_uri": tracking_uri}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def submission_id(study: Study, tracking_uri: str | None = None) -> str:
    return f"scaling-study-{study.spec.name}-{study_digest(study, tracking_uri)[:12]}"


def source_root() -> Path:
    """This source checkout (where pyproject.toml sits beside the package), else the current folder."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def _auth_headers() -> dict[str, str]:
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise UserError(f"RAY_AUTH_TOKEN_PATH: cannot read {path} ({exc.strerror}); allowed: a file holding "
                            "the cluster's token (`ray get-auth-token` on the head prints it)") from None
    return {"Authorization": f"Bearer {token}"} if token else {}


def _cluster_error(address: str, exc: Exception) -> UserError:
    text = str(exc.args[0]) if exc.args else str(exc)
    if "401" in text or "403" in text or "uthentication" in text:
        return UserError(f"Ray cluster at {address} refused the request ({text.splitlines()[0][:120]}); allowed: "
                         "export RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) with the cluster's token, which "
                         "`ray get-auth-token` prints on the head node")
    return UserError(f"Ray Jobs API at {address} is not reachable ({text.splitlines()[0][:160] if text else exc!r}); "
                     "allowed: the dashboard address, e.g. http://127.0.0.1:8265 through `ray dashboard "
                     "ray_cluster.yaml` port forwarding")


def connect(address: str | None):
    """A JobSubmissionClient for `address` (default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS, as `ray job`
    does), authenticated; a one-line UserError otherwise."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("--address: missing; allowed: the Ray dashboard URL, e.g. http://127.0.0.1:8265 "
                        "(or set RAY_API_SERVER_ADDRESS)")
    if "://" not in address:
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address, headers=_auth_headers())
    except Exception as exc:  # Ray raises ConnectionError or RuntimeError with the HTTP status in the text
        raise _cluster_error(address, exc) from None


def _list_jobs(client) -> list:
    try:
        return client.list_jobs()
    except Exception as exc:  # e.g. 401/403: the dashboard answers /api/version without a token
        raise _cluster_error(client.get_address(), exc) from None


def entrypoint_and_env(study: Study, root: Path, tracking_uri: str | None = None, *,
                       extend: bool = False) -> tuple[str, dict[str, str]]:
    """The job's shell entrypoint and its env vars, the spec's text among them (`extend`: `run --extend`).

    The spec always travels as text (so a spec in an excluded or git-ignored folder, or from outside
    the working directory, arrives too) and is written where it sat relative to the working
    directory, so its relative paths resolve as they did; a spec from elsewhere goes to `.scaling-study/`.
    """
    import yaml

    env = dict(QUIET_ENV)
    # the driver's ray.init adds QUIET_ENV again; same keys in the job's runtime_env are a conflict otherwise
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    spec = Path(study.file).resolve()
    try:
        folder = spec.parent.relative_to(root.resolve())
    except ValueError:
        folder = Path(SHIPPED_DIR)
    if not _SAFE_PATH.match(folder.as_posix()):
        folder = Path(SHIPPED_DIR)  # a path the entrypoint's shell would have to quote
    text = spec.read_text()
    if tracking_uri is not None:
        data = yaml.safe_load(text)
        data["tracking"] = {**(data.get("tracking") or {}), "uri": tracking_uri}
        text = yaml.safe_dump(data, sort_keys=False)
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    target = (folder / f".{study.spec.name}.submitted.yaml").as_posix()
    env[SPEC_TEXT_ENV], env[SPEC_PATH_ENV] = text, target
    home = '"${SCALING_STUDY_HOME:-$HOME/scaling-study}"'
    entry = (f'W="$PWD" && python -m scaling_study.submit && mkdir -p {home} && cd {home} && '
             f'scaling-study run "$W/{target}" --quiet' + (" --extend" if extend else ""))
    return entry, env


def _attempt(job, base: str) -> int:
    """1 for `base`, N for `base-N`, 0 for any other id."""
    sid = job.submission_id or ""
    rest = sid[len(base):] if sid.startswith(base) else "?"
    return 1 if not rest else int(rest[1:]) if rest[:1] == "-" and rest[1:].isdigit() else 0


def _attempts(client, base: str) -> list:
    """The jobs of one study, attempt 1 first (ids `base`, `base-2`, `base-3`, ...)."""
    return sorted((j for j in _list_jobs(client) if _attempt(j, base)), key=lambda j: _attempt(j, base))


def submit(client, study: Study, *, root: Path | None = None, tracking_uri: str | None = None,
           retry: bool = False, extend: bool = False) -> Submitted:
    """Start the study's job, or attach to the one that exists (see the module docstring); `extend`:
    the job runs `scaling-study run --extend` (a spec that extends a study of the same name)."""
    base = submission_id(study, tracking_uri)
    attempts = _attempts(client, base)
    if attempts:
        last = attempts[-1]
        status = str(last.status.value if hasattr(last.status, "value") else last.status)
        if not (retry and status in ("FAILED", "STOPPED")):
            return Submitted(last.submission_id, status, new=False)
        job_id = f"{base}-{_attempt(last, base) + 1}"
    else:
        job_id = base
    root = (root or source_root()).resolve()
    entry, env = entrypoint_and_env(study, root, tracking_uri, extend=extend)
    runtime_env = {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env}
    metadata = {METADATA_KEY: study.spec.name, "spec": Path(study.file).name, "study_digest": base.rsplit("-", 1)[1]}
    try:
        client.submit_job(entrypoint=entry, submission_id=job_id, runtime_env=runtime_env, metadata=metadata)
    except Exception as exc:
        if "already exists" in str(exc):  # a concurrent submit of the same study won the race
            return Submitted(job_id, str(client.get_job_status(job_id).value), new=False)
        raise _cluster_error(client.get_address(), exc) from None
    return Submitted(job_id, "PENDING", new=True)


def follow(client, job_id: str, write: Callable[[str], None]) -> str:
    """Stream the job's logs to `write` until it ends; its final status."""
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())
    return str(client.get_job_status(job_id).value)


def study_jobs(client, study: str | None = None) -> list[dict]:
    """One row per study job on the cluster (optionally of one study), oldest first."""
    rows = []
    for job in _list_jobs(client):
        name = (job.metadata or {}).get(METADATA_KEY)
        if name is None or (study is not None and name != study):
            continue
        seconds = ((job.end_time or 0) - (job.start_time or 0)) / 1000 if job.end_time else None
        rows.append({"submission_id": job.submission_id, "study": name,
                     "status": str(job.status.value if hasattr(job.status, "value") else job.status),
                     "start_time": job.start_time or 0, "seconds": seconds,
                     "message": (job.message or "").strip().splitlines()[0][:100] if job.message else ""})
    return sorted(rows, key=lambda r: r["start_time"])


def _write_shipped_spec() -> None:
    """On the cluster, before `scaling-study run`: write the spec that travelled in the job's environment."""
    path = Path(os.environ[SPEC_PATH_ENV])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(os.environ[SPEC_TEXT_ENV])


if __name__ == "__main__":
    _write_shipped_spec()
