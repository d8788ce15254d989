"""Read a study's results back from MLflow as one tidy DataFrame.

    from scaling_study import results
    df = results.load("smoke")                         # ./studies/smoke/mlflow (the embedded default)
    df = results.load("scholarbert", tracking_uri="http://127.0.0.1:5000")
    df.pivot_table(index="task", columns="model", values="test_f1")

One row per finetune job (model x task x epochs x seed), with the factor columns (model,
model_size, data_volume, steps, task, epochs, seed, node ids) and the metric columns
(test_f1, dev_f1, ..., collapsed). Runs are read page by page: MLflow's `search_runs` returns one
page and says nothing about the rest.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scaling_study.errors import UserError
from scaling_study.tracking import KIND_TAG, NODE_TAG, PAGE, check_server, redact_uri

FACTORS = ("model", "model_size", "data_volume", "steps", "task", "epochs", "seed")
INT_FACTORS = ("steps", "epochs", "seed")


def locate(study: str, *, tracking_uri: str | None = None, root: str | Path = "studies") -> tuple[str, str]:
    """(tracking URI, experiment name) of a study given by name or by its spec file."""
    if study.endswith((".yaml", ".yml")):
        from scaling_study.orchestration import Layout
        from scaling_study.spec import expand_env, load_spec

        loaded = load_spec(study)
        name = loaded.spec.tracking.experiment or loaded.spec.name
        uri = tracking_uri or (expand_env(loaded.spec.tracking.uri) if loaded.spec.tracking.uri else None)
        db = Layout.of(loaded).mlflow / "mlflow.db"
    else:
        name = study
        uri = tracking_uri
        db = Path(root).expanduser().resolve() / study / "mlflow" / "mlflow.db"
    if uri:
        check_server(uri)
        return uri, name
    if not db.is_file():
        raise UserError(f"study {study!r}: no results at {db}; allowed: a study run with the embedded tracking "
                        "server (scaling-study run), --root for another storage root, or --tracking-uri")
    return f"sqlite:///{db}", name


def _client_and_experiment(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise UserError(f"study {name!r}: no MLflow experiment of that name at {redact_uri(uri)}")
    return client, experiment.experiment_id


def search_all(client, experiment_id: str, filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=PAGE, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def load(study: str, *, tracking_uri: str | None = None, root: str | Path = "studies") -> pd.DataFrame:
    """Every finished finetune job of a study, one row each (see the module docstring)."""
    uri, name = locate(study, tracking_uri=tracking_uri, root=root)
    client, experiment_id = _client_and_experiment(uri, name)
    rows = []
    for run in search_all(client, experiment_id, f"tags.{KIND_TAG} = 'finetune' and attributes.status = 'FINISHED'"):
        tags, params = run.data.tags, run.data.params
        row = {"node_id": tags.get(NODE_TAG), "run_id": run.info.run_id}
        for factor in FACTORS:
            row[factor] = params.get(factor, tags.get(factor))
        row["collapsed"] = tags.get("collapsed") == "True"
        row.update({k: v for k, v in run.data.metrics.items() if k != "collapsed"})
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else ["node_id", "run_id", *FACTORS, "collapsed"])
    for col in INT_FACTORS:
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    order = ["model", "model_size", "data_volume", "steps", "task", "epochs", "seed"]
    return df.sort_values([c for c in order if c in df]).reset_index(drop=True) if rows else df


def status(study: str, *, tracking_uri: str | None = None, root: str | Path = "studies") -> pd.DataFrame:
    """Runs of a study by node kind and MLflow status."""
    uri, name = locate(study, tracking_uri=tracking_uri, root=root)
    client, experiment_id = _client_and_experiment(uri, name)
    rows = [{"kind": r.data.tags.get(KIND_TAG, "?"), "status": r.info.status} for r in search_all(client, experiment_id)]
    if not rows:
        return pd.DataFrame(columns=["kind"])
    return pd.crosstab(pd.DataFrame(rows)["kind"], pd.DataFrame(rows)["status"]).reset_index()
