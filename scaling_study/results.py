"""Read a study's results back from MLflow as one tidy DataFrame, cached and refreshed incrementally.

    from scaling_study import results
    df = results.load("smoke")                       # ./studies/smoke, else where "smoke" last ran (studies)
    df = results.load("scholarbert", tracking_uri="http://127.0.0.1:5000")
    df = results.load("smoke", refresh=False)        # the Parquet cache only; no tracking server needed
    df.pivot_table(index="task", columns="model_size", values="test_f1")      # mean over seeds
    results.pivot(df, "task", "model")               # the paper table (the report's), F1 points
    curves = results.loss_curves("smoke")            # pretraining loss against tokens seen

One row per finished finetune job (model x task x epochs x seed). The columns (`COLUMNS`, then the
metrics, then `collapsed`):

- identity: run_id, node_id, study
- factors: model (display name: "tiny | 10%", "tiny | 10% | no pretraining" for the control arm's
  step-0 checkpoint, or the external model's name), model_source
  ("pretrained" or "external"), model_size (preset; NA for external), parameters (exact count),
  data_volume (as the spec writes it; NA for external), tokens (in that data volume's corpus build),
  pretrain_tokens and pretrain_flops (up to the checkpoint; NA for external), steps (0 for the
  control arm, `pretrain.random_init`), epochs, task, task_type (ner, re, cls), domain, seed
- metrics: every logged metric as a float column (test_f1, dev_f1, ... as fractions; not the
  per-epoch curves, `epoch/...`), and collapsed (bool)

A study given by name is found from any working directory (`studies.root_of`: `root`, else
./studies/<name>, else the root the user's index recorded); its runs are read from `tracking_uri`,
else the spec's tracking.uri, else $MLFLOW_TRACKING_URI, else the embedded server's database.

The study driver logs every factor with each finetune run (`grid.cell_factors`); for runs logged
before it did, the missing ones are derived here: task_type and domain from the task registry,
tokens and the vocabulary from the corpus build's run, parameters and FLOPs from the presets, batch
and sequence length from the spec the study run keeps as an artifact.

Cache: `<root>/<study>/cache/results-<key>.parquet` (or `cache_dir`), one file per tracking URI
and experiment, written atomically, its high-water mark in the Parquet metadata. A refresh asks
MLflow only for finetune runs that ended since then (`attributes.end_time`, less `overlap_s` for
clocks that disagree between machines), replaces those rows, and drops runs that were deleted (a
search of deleted runs; a restored one is fetched again). MLflow has no search on a run's last
update, so metrics logged to a run after it was marked finished, without finishing it again, are
not seen: the study driver always finishes a run again when it re-logs it.

Runs are read page by page (`page_size`, up to the server's 50,000) by `runreader`: JSON over
REST, or SQL when the study's tracking store is a local sqlite file (the embedded default; what a
server spends its time on is in `runreader.SqliteReader`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import pandas as pd

from scaling_study.errors import UserError, file_problem
from scaling_study.runreader import PAGE_SIZE, Reader, RunRecord, open_reader, search_all  # noqa: F401 (re-exported)
from scaling_study.tracking import (
    KIND_TAG,
    NODE_TAG,
    PARENT_TAG,
    STUDY_TAG,
    TrackingStoreError,
    check_server,
    check_sqlite_store,
    check_uri,
    reading,
    redact_uri,
)

IDENTITY = ("run_id", "node_id", "study")
FACTORS = ("model", "model_source", "model_size", "parameters", "data_volume", "tokens", "pretrain_tokens",
           "pretrain_flops", "steps", "epochs", "task", "task_type", "domain", "seed")
COLUMNS = IDENTITY + FACTORS
INT_COLUMNS = ("parameters", "tokens", "pretrain_tokens", "steps", "epochs", "seed")
FLOAT_COLUMNS = ("pretrain_flops",)
LOGGED = ("model", "model_size", "data_volume", "parameters", "tokens", "pretrain_tokens", "pretrain_flops",
          "steps", "epochs", "task", "task_type", "domain", "seed")
"""Factors read from a run's params (or tags); model_source is derived (the tag of that name is a path)."""
DERIVED = ("parameters", "tokens", "pretrain_tokens", "pretrain_flops", "task_type", "domain")
SORT = ("model_source", "model", "steps", "task", "epochs", "seed", "run_id")
CURVE_METRICS = ("tokens_seen", "loss", "mlm_accuracy")
OVERLAP_S = 60.0
CONTROL = "no pretraining"
"""The control arm's model names end with this (`pretrain.random_init`: the step-0 checkpoint)."""
CACHE_FORMAT = 1


# ----------------------------------------------------------------------------------- where a study is


@dataclasses.dataclass(frozen=True)
class Source:
    uri: str
    experiment: str
    folder: Path
    """The study's storage folder (the cache lives under it)."""


def _source(study: str, tracking_uri: str | None, root: str | Path | None) -> Source:
    """Where a study's runs are: `tracking_uri`; else the spec's tracking.uri (a spec file, or the one the
    user's index names for a bare name); else $MLFLOW_TRACKING_URI; else the embedded server's database
    in the study's folder (`studies.root_of`: --root, ./studies, or the index)."""
    from scaling_study import studies
    from scaling_study.artifacts import Layout, pull_tracking
    from scaling_study.spec import load_spec

    if tracking_uri:
        check_uri(tracking_uri, "--tracking-uri")
    loaded = load_spec(study) if study.endswith((".yaml", ".yml")) else None
    if loaded is not None:
        layout = Layout.of(loaded)
    else:
        used = studies.root_of(study, root)
        layout = Layout.named(study, used)  # checks the name: its cache stays under the root
        found = studies.where(study) if root is None else None
        if found is not None and found.root == used and Path(found.spec).is_file():
            with contextlib.suppress(UserError):  # a spec broken since: the folder still holds the study
                candidate = load_spec(found.spec)
                loaded = candidate if candidate.spec.name == study else None
    name = (loaded.spec.tracking.experiment or loaded.spec.name) if loaded is not None else study
    uri = tracking_uri or studies.tracking_uri(loaded)
    if uri:
        return Source(uri, name, layout.root)
    # the embedded server's db: here, or downloaded from an object-store root (artifacts.pull_tracking)
    return Source(f"sqlite:///{pull_tracking(layout) / 'mlflow.db'}", name, layout.root)


def locate(study: str, *, tracking_uri: str | None = None, root: str | Path | None = None) -> tuple[str, str]:
    """(tracking URI, experiment name) of a study given by name or by its spec file; checks it answers."""
    src = _source(study, tracking_uri, root)
    if src.uri.startswith("sqlite:///"):
        db = Path(src.uri[len("sqlite:///"):])
        if not db.exists():
            raise UserError(f"study {study!r}: no results at {db}; allowed: a study run with the embedded tracking "
                            "server (scaling-study run), --root for another storage root, or --tracking-uri")
        problem = file_problem(db)
        if problem:
            raise TrackingStoreError(f"tracking store {db}: {problem}; allowed: the sqlite file an MLflow server wrote")
        check_sqlite_store(db, src.uri)
    else:
        check_server(src.uri)
    return src.uri, src.experiment


# ----------------------------------------------------------------------------------- rows


def _row(run: RunRecord, study: str) -> dict:
    tags, params, metrics = run.tags, run.params, run.metrics
    row = {"run_id": run.run_id, "node_id": tags.get(NODE_TAG), "study": tags.get(STUDY_TAG, study)}
    for key in LOGGED:
        row[key] = params.get(key, tags.get(key))
    external = row["model_size"] == "external"
    row["model_source"] = "external" if external else "pretrained"
    if external:
        row["model_size"] = row["data_volume"] = row["pretrain_tokens"] = row["pretrain_flops"] = None
    elif row["model_size"] is not None:  # the control arm (steps 0) is a model of its own in every table
        control = str(row["steps"]) == "0"
        row["model"] = f"{row['model_size']} | {row['data_volume']}{f' | {CONTROL}' if control else ''}"
    row.update({k: v for k, v in metrics.items() if k != "collapsed" and not k.startswith("epoch/")})  # curves
    row["collapsed"] = tags["collapsed"] == "True" if "collapsed" in tags else bool(metrics.get("collapsed"))
    row["_parent"] = tags.get(PARENT_TAG)
    return row


def _normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Contract column order and dtypes, rows in a stable order: a cached-and-refreshed frame equals a fresh one."""
    for col in (*COLUMNS, "collapsed"):
        if col not in df:
            df[col] = None
    metrics = sorted(c for c in df.columns if c not in COLUMNS and c != "collapsed" and not c.startswith("_"))
    df = df[[*COLUMNS, *metrics, "collapsed"]].copy()
    for col in COLUMNS:
        if col in INT_COLUMNS:
            df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
        elif col in FLOAT_COLUMNS:
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
        else:
            df[col] = df[col].astype("string")
    for col in metrics:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    df["collapsed"] = df["collapsed"].fillna(False).astype(bool)
    return df.sort_values(list(SORT), na_position="last", kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------- derived factors


@functools.lru_cache(maxsize=1)
def _registry() -> dict:
    from scaling_study.tasks.registry import discover

    return discover([]).tasks


class _Context:
    """What older runs lack, from the study's other runs: corpus builds, pretraining runs, the spec."""

    def __init__(self, reader: Reader):
        self.reader = reader
        self.runs = {r.run_id: r for kind in ("pretrain", "corpus") for r in reader.runs(kind)}
        self.by_node = {r.tags.get(NODE_TAG): r for r in self.runs.values()}

    @functools.cached_property
    def spec(self) -> dict:
        """The study run's spec.yaml artifact as plain YAML (not validated: its relative paths are elsewhere)."""
        import tempfile

        import yaml

        study = self.reader.runs("study")
        quiet = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a bar for one small file, on stderr
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = self.reader.client.download_artifacts(study[0].run_id, "spec.yaml", tmp)
                data = yaml.safe_load(Path(path).read_text())
            return data if isinstance(data, dict) else {}
        except Exception:  # no study run or no artifact: those factors stay NA
            return {}
        finally:
            if quiet is None:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
            else:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = quiet

    def pretrain_setting(self, key: str):
        from scaling_study.spec import PretrainSpec

        value = (self.spec.get("pretrain") or {}).get(key)
        return value if value is not None else next(f.default for f in dataclasses.fields(PretrainSpec)
                                                    if f.name == key)

    def corpus_metrics(self, parent_run_id: str | None) -> dict:
        parent = self.runs.get(parent_run_id or "")
        corpus = self.by_node.get(parent.tags.get("corpus_id")) if parent is not None else None
        return corpus.metrics if corpus is not None else {}

    def preset(self, size: str):
        from scaling_study.models import load_presets

        try:
            return load_presets(self.spec.get("model_presets") or None).get(size)
        except Exception:
            return None

    def fill(self, row: dict) -> None:
        import types

        from scaling_study.models import pretrain_factors

        task = _registry().get(row["task"])
        if task is not None:
            row["task_type"] = row["task_type"] or task.type
            row["domain"] = row["domain"] or task.domain
        if row["model_source"] != "pretrained" or row["steps"] is None:
            return
        corpus = self.corpus_metrics(row["_parent"])
        if row["tokens"] is None and "tokens" in corpus:
            row["tokens"] = corpus["tokens"]
        recipe = types.SimpleNamespace(**{k: self.pretrain_setting(k) for k in ("batch_size", "seq_len", "mask_rate")})
        factors = pretrain_factors(self.preset(row["model_size"]), corpus.get("vocab_size"), row["steps"], recipe)
        for column, value in (("pretrain_tokens", factors.tokens), ("parameters", factors.parameters),
                              ("pretrain_flops", factors.flops)):
            if row[column] is None:
                row[column] = value


def _rows(runs: list[RunRecord], study: str, reader: Reader) -> pd.DataFrame:
    rows = [_row(run, study) for run in runs]
    wanted = {"pretrained": DERIVED, "external": DERIVED[-2:]}
    if any(row[k] is None for row in rows for k in wanted[row["model_source"]]):
        context = _Context(reader)
        for row in rows:
            context.fill(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------- the cache


def cache_path(src: Source, cache_dir: str | Path | None = None) -> Path:
    key = hashlib.sha256(f"{src.uri}\n{src.experiment}".encode()).hexdigest()[:12]
    return Path(cache_dir or src.folder / "cache") / f"results-{key}.parquet"


def _read_cache(path: Path) -> tuple[pd.DataFrame, dict] | None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {})[b"scaling_study"])
    except (OSError, KeyError, ValueError):
        return None
    if meta.get("format") != CACHE_FORMAT:
        return None
    return table.to_pandas(), meta


def _write_cache(path: Path, df: pd.DataFrame, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"scaling_study": json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # readers see the old cache or the new one, never half of one


# ----------------------------------------------------------------------------------- loading


def load(study: str, tracking_uri: str | None = None, root: str | Path | None = None, refresh: bool = True, *,
         cache_dir: str | Path | None = None, page_size: int = PAGE_SIZE, overlap_s: float = OVERLAP_S,
         use_cache: bool = True, direct: bool = True) -> pd.DataFrame:
    """Every finished finetune job of a study, one row each (see the module docstring).

    `refresh=False` reads the cache only; `use_cache=False` neither reads nor writes it; `direct=False`
    reads a local sqlite store through MLflow's store rather than with SQL (`SqliteReader`). The returned
    frame's `attrs` say how it was made: `fetched` (runs read from MLflow), `mode` (full,
    incremental or cache) and `cache` (the file).
    """
    src = _source(study, tracking_uri, root)
    path = cache_path(src, cache_dir)
    cached = _read_cache(path) if use_cache else None
    if cached is not None and cached[1].get("experiment") != src.experiment:
        cached = None
    if not refresh:
        if cached is None:
            raise UserError(f"study {study!r}: no results cache at {path}; allowed: load with refresh "
                            "(drop --no-refresh) once to create it")
        df, meta = cached
        return _with_attrs(df, fetched=0, mode="cache", cache=path)
    uri, name = locate(study, tracking_uri=tracking_uri, root=root)
    with reading(uri):
        reader = open_reader(uri, name, page_size, direct)
        df, meta, mode, fetched = _fetch(reader, cached, name, overlap_s)
    if use_cache:
        _write_cache(path, df, {"format": CACHE_FORMAT, "uri": redact_uri(uri), "experiment": name, **meta})
    return _with_attrs(df, fetched=fetched, mode=mode, cache=path if use_cache else None)


def _fetch(reader: Reader, cached: tuple | None, name: str, overlap_s: float) -> tuple[pd.DataFrame, dict, str, int]:
    """The study's rows: the cache refreshed with what changed since its high-water mark, or all of them;
    plus the cache's new metadata, how they were made and how many runs were read."""
    experiment_id = reader.experiment_id
    if cached is not None and cached[1].get("experiment_id") == experiment_id:
        old, meta = cached
        since = int(meta["high_water"] - overlap_s * 1000)
        changed = reader.runs("finetune", ended_after=since)
        deleted = {r.run_id for r in reader.runs("finetune", deleted=True)}
        restored = sorted(set(meta.get("deleted", [])) - deleted - {r.run_id for r in changed})
        if restored:
            changed += reader.runs("finetune", run_ids=restored)
        finished = [r for r in changed if r.status == "FINISHED"]
        drop = deleted | {r.run_id for r in changed}
        new = _rows(finished, name, reader)
        frames = [f for f in (old[~old["run_id"].isin(drop)], new) if len(f)]
        df = _normalize(pd.concat(frames, ignore_index=True) if frames else old.iloc[:0])
        high = max([meta["high_water"], *(r.end_time or 0 for r in changed)])
        mode, fetched = "incremental", len(changed)
    else:
        runs = reader.runs("finetune", finished=True)
        deleted = {r.run_id for r in reader.runs("finetune", deleted=True)}  # to notice one restored later
        df = _normalize(_rows(runs, name, reader))
        high = max((r.end_time or 0 for r in runs), default=0)
        mode, fetched = "full", len(runs)
    df.attrs = {}
    return df, {"experiment_id": experiment_id, "high_water": high, "deleted": sorted(deleted)}, mode, fetched


def _with_attrs(df: pd.DataFrame, **attrs) -> pd.DataFrame:
    df.attrs.update({k: str(v) if isinstance(v, Path) else v for k, v in attrs.items()})
    return df


# ----------------------------------------------------------------------------------- queries


def _allowed(df: pd.DataFrame) -> str:
    return ", ".join(df.columns)


def select(df: pd.DataFrame, where: dict[str, list[str]], *, flag: str = "--where") -> pd.DataFrame:
    """Rows whose `column` is one of the given values, for every column in `where` (values as text).

    An unknown column or a value no row has is a UserError naming `flag`, the value and what is allowed.
    """
    keep = pd.Series(True, index=df.index)
    for column, values in where.items():
        if column not in df:
            raise UserError(f"{flag} {column}=...: unknown column {column!r}; allowed: {_allowed(df)}")
        text = df[column].astype("string")
        present = set(text.dropna())
        missing = [v for v in values if v not in present]
        if missing:
            shown = ", ".join(sorted(present)[:20]) + (", ..." if len(present) > 20 else "")
            raise UserError(f"{flag} {column}={','.join(values)}: no run has {column} = {missing[0]!r}; "
                            f"allowed: {shown or '(no values)'}")
        keep &= text.isin(values).fillna(False)
    return df[keep].reset_index(drop=True)


def parse_where(expressions: list[str], *, flag: str = "--where") -> dict[str, list[str]]:
    """["task=scierc_re", "model_size=tiny,base"] -> {"task": ["scierc_re"], "model_size": ["tiny", "base"]}."""
    out: dict[str, list[str]] = {}
    for expr in expressions:
        column, sep, values = expr.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not column.strip() or not items:
            raise UserError(f"{flag} {expr!r}: expected COLUMN=VALUE[,VALUE...]; allowed: e.g. task=scierc_re "
                            "or model_size=tiny,base")
        out.setdefault(column.strip(), []).extend(items)
    return out


def pivot(df: pd.DataFrame, row: str, column: str, value: str = "test_f1", *,
          include_collapsed: bool = False) -> pd.DataFrame:
    """The paper table's definition (`analysis.table_rows`) for any ROW x COL: the mean of `value` over
    seeds per cell, every factor the table does not show at the study's largest level (after any
    `select`), collapsed runs left out unless `include_collapsed`, scores (F1, precision, ...) in
    points. `attrs["definition"]` says so in one sentence; `--pivot task model` is the report's table.
    """
    from scaling_study import analysis

    for flag, name in (("--pivot", row), ("--pivot", column), ("--value", value)):
        if name not in df:
            raise UserError(f"{flag} {name}: unknown column {name!r}; allowed: {_allowed(df)}")
    if not pd.api.types.is_numeric_dtype(df[value]) or pd.api.types.is_bool_dtype(df[value]):
        numeric = [c for c in df.columns if pd.api.types.is_float_dtype(df[c])]
        raise UserError(f"--value {value}: not a numeric column; allowed: {', '.join(numeric)}")
    sel = analysis.table_rows(df, (row, column), include_collapsed=include_collapsed)
    rows = sel.rows.assign(**{value: sel.rows[value] * (100.0 if analysis.is_score(value) else 1.0)})
    table = rows.pivot_table(index=row, columns=column, values=value, aggfunc="mean", observed=True)
    if column == "model" and len(table.columns):
        order = [m for m in analysis.model_order(rows) if m in set(map(str, table.columns))]
        table = table[[next(c for c in table.columns if str(c) == m) for m in order]]
    table.columns = [str(c) for c in table.columns]
    table = table.reset_index()
    table.attrs["definition"] = sel.definition(value)
    return table


def loss_curves(study: str, tracking_uri: str | None = None, root: str | Path | None = None, *,
                page_size: int = PAGE_SIZE) -> pd.DataFrame:
    """Pretraining metric histories, one row per pretraining run and logged step.

    Columns: pretrain_node_id, model_size, data_volume, parameters, step, tokens_seen, loss, and
    mlm_accuracy where logged.
    """
    uri, name = locate(study, tracking_uri=tracking_uri, root=root)
    with reading(uri):
        return _curves(_Context(open_reader(uri, name, page_size)))


def _curves(context: _Context) -> pd.DataFrame:
    client = context.reader.client
    frames = []
    for run in context.runs.values():
        tags, params = run.tags, run.params
        if tags.get(KIND_TAG) != "pretrain":
            continue
        series = {}
        for key in CURVE_METRICS:
            if key in run.metrics:  # the latest value is there for every metric ever logged
                history = client.get_metric_history(run.run_id, key)  # the client follows page tokens
                series[key] = pd.Series({m.step: m.value for m in history}, dtype="float64")
        if "loss" not in series:
            continue
        size = params.get("model_size", tags.get("model_size"))
        preset, vocab = context.preset(size), context.corpus_metrics(run.run_id).get("vocab_size")
        frame = pd.DataFrame(series).rename_axis("step").reset_index()
        frame.insert(0, "pretrain_node_id", tags.get(NODE_TAG))
        frame.insert(1, "model_size", size)
        frame.insert(2, "data_volume", params.get("data_volume", tags.get("data_volume")))
        frame.insert(3, "parameters", _parameters(preset, vocab))
        frames.append(frame)
    columns = ["pretrain_node_id", "model_size", "data_volume", "parameters", "step", "tokens_seen", "loss"]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
    df = pd.concat(frames, ignore_index=True)
    for col in ("tokens_seen", "loss"):
        if col not in df:
            df[col] = float("nan")
    df = df[[*columns, *(c for c in df.columns if c not in columns)]]
    for col in ("pretrain_node_id", "model_size", "data_volume"):
        df[col] = df[col].astype("string")
    df["parameters"] = df["parameters"].astype("Int64")
    df["step"] = df["step"].astype("int64")
    return df.sort_values(["model_size", "data_volume", "pretrain_node_id", "step"]).reset_index(drop=True)


def _parameters(preset, vocab) -> int | None:
    from scaling_study.models import count_parameters

    return count_parameters(preset, int(vocab)) if preset is not None and vocab is not None else None


def status(study: str, *, tracking_uri: str | None = None, root: str | Path | None = None) -> pd.DataFrame:
    """Runs of a study by node kind and MLflow status."""
    uri, name = locate(study, tracking_uri=tracking_uri, root=root)
    with reading(uri):
        rows = [{"kind": r.tags.get(KIND_TAG, "?"), "status": r.status} for r in open_reader(uri, name).search()]
    if not rows:
        return pd.DataFrame(columns=["kind"])
    return pd.crosstab(pd.DataFrame(rows)["kind"], pd.DataFrame(rows)["status"]).reset_index()
