"""Read an MLflow experiment's runs fast: every page, JSON over REST, plain SQL over a local sqlite store.

    from scaling_study.runreader import open_reader
    reader = open_reader("http://127.0.0.1:5000", "smoke")          # or "sqlite:///studies/smoke/mlflow/mlflow.db"
    runs = reader.runs("finetune", finished=True)                    # RunRecord: run_id, status, end_time, tags, ...
    runs = reader.runs("finetune", ended_after=1_700_000_000_000)    # ended since then (ms), any status
    deleted = reader.runs("finetune", deleted=True)

What `results` reads runs with. `MlflowClient.search_runs` returns one page (1,000 runs by
default) and says nothing about the rest; `search_all` follows the page tokens. Why the readers
exist at all is in their docstrings: measured on 10,000 runs by benchmarks/results_load.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path

from scaling_study.errors import UserError
from scaling_study.tracking import KIND_TAG, redact_uri, search_all

PAGE_SIZE = 10_000
"""Runs per page of a search: MLflow servers allow up to 50,000; the client defaults to 1,000."""


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """The parts of an MLflow run results reads, from a REST page or a store's Run entity."""

    run_id: str
    status: str
    end_time: int | None
    tags: dict
    params: dict
    metrics: dict

    @classmethod
    def of(cls, run) -> RunRecord:
        return cls(run.info.run_id, run.info.status, run.info.end_time, run.data.tags, run.data.params,
                   run.data.metrics)

    @classmethod
    def from_json(cls, run: dict) -> RunRecord:
        info, data = run["info"], run.get("data", {})
        return cls(info["run_id"], info.get("status", ""), int(info["end_time"]) if info.get("end_time") else None,
                   {t["key"]: t["value"] for t in data.get("tags", [])},
                   {p["key"]: p["value"] for p in data.get("params", [])},
                   {m["key"]: float(m["value"]) for m in data.get("metrics", [])})


class Reader:
    """Searches one experiment, every page.

    Over HTTP it posts to the REST endpoint itself and reads the JSON: `MlflowClient.search_runs`
    turns every page into protobuf messages and then into entities, which took half the time of a
    10,000-run load (benchmarks/results_load.py). Credentials come from MLflow's own environment
    variables, as for the client. A sqlite or other store URI goes through the client's store.
    """

    def __init__(self, uri: str, experiment: str, page_size: int):
        self.uri, self.experiment, self.page_size = uri, experiment, page_size

    @functools.cached_property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    @functools.cached_property
    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            raise UserError(f"study {self.experiment!r}: no MLflow experiment of that name at {redact_uri(self.uri)}")
        return found.experiment_id

    def search(self, filter_string: str = "", *, deleted: bool = False) -> list[RunRecord]:
        if not self.uri.startswith(("http://", "https://")):
            return [RunRecord.of(r) for r in search_all(self.client, self.experiment_id, filter_string,
                                                   page_size=self.page_size, deleted=deleted)]
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request_safe

        creds = get_default_host_creds(self.uri)
        body = {"experiment_ids": [self.experiment_id], "filter": filter_string, "max_results": self.page_size,
                "run_view_type": "DELETED_ONLY" if deleted else "ACTIVE_ONLY"}
        runs = []
        while True:
            page = json.loads(http_request_safe(creds, "/api/2.0/mlflow/runs/search", "POST", json=body).text)
            runs.extend(RunRecord.from_json(r) for r in page.get("runs", []))
            if not page.get("next_page_token"):
                return runs
            body["page_token"] = page["next_page_token"]

    def runs(self, kind: str, *, finished: bool = False, ended_after: int | None = None,
             run_ids: list[str] | None = None, deleted: bool = False) -> list[RunRecord]:
        """Runs of one node kind; `finished`: status FINISHED; `ended_after`: end_time above it (ms)."""
        parts = [f"tags.{KIND_TAG} = '{kind}'"]
        if finished:
            parts.append("attributes.status = 'FINISHED'")
        if ended_after is not None:
            parts.append(f"attributes.end_time > {int(ended_after)}")
        if run_ids:
            parts.append(f"attributes.run_id IN ({', '.join(repr(str(i)) for i in run_ids)})")
        return self.search(" and ".join(parts), deleted=deleted)


class SqliteReader(Reader):
    """Reads a local sqlite tracking store with four SQL queries instead of through MLflow's store.

    An MLflow server (and `SqlAlchemyStore` in process) builds an ORM object for every tag, param
    and metric of every run, about 50 per finetune run: 10,000 runs took 20-25 s of server CPU,
    whatever the page size, and the protobuf JSON of the reply a few more. This reads the same
    tables (`runs`, `tags`, `params`, `latest_metrics`) as they are. It is used only when the
    database has the columns read here; otherwise, and for anything but sqlite, `Reader` is.
    tests/test_results.py checks that both give the same results.
    """

    COLUMNS = {"runs": {"run_uuid", "status", "end_time", "experiment_id", "lifecycle_stage"},
               "tags": {"key", "value", "run_uuid"}, "params": {"key", "value", "run_uuid"},
               "latest_metrics": {"key", "value", "is_nan", "run_uuid"}}

    def __init__(self, path: Path, *args):
        super().__init__(*args)
        self.path = path

    @functools.cached_property
    def experiment_id(self) -> str:  # without MlflowClient: opening a sqlite store checks its migrations
        import sqlite3

        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT experiment_id FROM experiments WHERE name = ? AND lifecycle_stage = 'active'",
                              (self.experiment,)).fetchone()
        if row is None:
            raise UserError(f"study {self.experiment!r}: no MLflow experiment of that name at {redact_uri(self.uri)}")
        return str(row[0])

    @classmethod
    def usable(cls, path: Path) -> bool:
        import sqlite3

        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
                return all(cols <= {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
                           for table, cols in cls.COLUMNS.items())
        except sqlite3.Error:
            return False

    def runs(self, kind: str, *, finished: bool = False, ended_after: int | None = None,
             run_ids: list[str] | None = None, deleted: bool = False) -> list[RunRecord]:
        import sqlite3

        where = ["r.experiment_id = ?", "r.lifecycle_stage = ?", "k.value = ?"]
        args: list = [int(self.experiment_id), "deleted" if deleted else "active", kind]
        if finished:
            where.append("r.status = 'FINISHED'")
        if ended_after is not None:
            where.append("r.end_time > ?")
            args.append(int(ended_after))
        if run_ids:
            where.append(f"r.run_uuid IN ({', '.join('?' * len(run_ids))})")
            args.extend(run_ids)
        chosen = (f"SELECT r.run_uuid FROM runs r JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = '{KIND_TAG}' "
                  f"WHERE {' AND '.join(where)}")
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)) as con:
            con.execute("BEGIN")  # one snapshot for the four queries, while the server may be writing
            info = con.execute(f"SELECT run_uuid, status, end_time FROM runs WHERE run_uuid IN ({chosen})",
                               args).fetchall()
            found = {rid: ({}, {}, {}) for rid, _, _ in info}
            for slot, query in enumerate((f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({chosen})",
                                          f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({chosen})",
                                          "SELECT run_uuid, key, CASE WHEN is_nan THEN NULL ELSE value END "
                                          f"FROM latest_metrics WHERE run_uuid IN ({chosen})")):
                for rid, key, value in con.execute(query, args):
                    found[rid][slot][key] = float("nan") if slot == 2 and value is None else value
            con.execute("COMMIT")
        return [RunRecord(rid, status, end, *found[rid]) for rid, status, end in info]


def open_reader(uri: str, experiment: str, page_size: int = PAGE_SIZE, direct: bool = True) -> Reader:
    """A reader of the study's experiment (checked to exist)."""
    path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if direct and path is not None and SqliteReader.usable(path):
        reader = SqliteReader(path, uri, experiment, page_size)
    else:
        reader = Reader(uri, experiment, page_size)
    reader.experiment_id  # noqa: B018 - fails here, with a clear message, if there is no such experiment
    return reader
