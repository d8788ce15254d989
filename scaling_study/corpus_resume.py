"""Resuming a killed corpus build where it stopped (used by `scaling_study.corpus`).

    from scaling_study import corpus_resume
    key = corpus_resume.fingerprint(node_ids, files, options)   # what makes two builds the same
    corpus_resume.adopt(out_dir, tmp, key)    # a dead build's partial folder of this node becomes `tmp`
    states = corpus_resume.load(tmps, key)    # every volume's saved state, or None: build from scratch
    corpus_resume.save(tmp, state)            # atomically, after training and after each closed shard
    corpus_resume.finish(tmp)                 # the build is complete: its state goes

A build writes each volume into a hidden partial folder (`.<node>.partial-<host>-<pid>`). It saves
there, in `build-state.json`, what the pack pass needs once the tokenizers are trained (the
tokenizer, its sample's size, the key limit, the scan's counts) and, after each shard it closes,
where packing stands: how many shards are closed (all but the last of a build have
`shard_sequences` rows, so a count says which), the first piece not fully in them and how many of
that piece's rows they hold, and the accounting of the pieces before it. The file stays small
whatever the number of shards: it is rewritten at every close. A killed build's folder stays
(the next build on the same host finds its process gone); the next build of the same nodes from
the same inputs and options takes it over and packs only from that piece on, dropping the rows the
closed shards already hold, so the shards come out byte-identical to an uninterrupted build's. The
scan, the samples and the training are not redone; what is lost is the packing since each
volume's last closed shard (at most `shard_sequences` rows per volume). The pack pass reads the
input again from the piece the furthest-behind volume needs (a small volume closes shards seldom),
but each volume tokenizes only from its own piece on (`pack_piece(starts=...)`). A build killed
before its tokenizers were saved, or while it rebalances its shards at the very end, starts over.
Any mismatch (other inputs, options, builder, a shard missing or of another length) and the build
starts from nothing, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from pathlib import Path

from scaling_study.storage import write_atomic

STATE = "build-state.json"
TOKENIZER = "trained-tokenizer.json"  # beside the state, which is rewritten at every closed shard
STATE_VERSION = 1


def fingerprint(node_ids: list[str], files: list, options: dict) -> str:
    """What a resumed build must share with the killed one: the nodes (their ids hold the corpus's
    inputs and the builder), the input files as found (path, size, mtime) and the build's options."""
    text = json.dumps({"version": STATE_VERSION, "nodes": node_ids, "options": options,
                       "files": [[f.path, f.size, f.mtime] for f in files]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _partial_dirs(out_dir: Path) -> list[Path]:
    return sorted(out_dir.parent.glob(f".{out_dir.name}.partial-*"))


def _dead_here(folder: Path, out_dir: Path) -> bool:
    """Whether `folder` is a partial build of `out_dir` by a process of this host that has ended."""
    match = re.fullmatch(rf"\.{re.escape(out_dir.name)}\.partial-(.+)-(\d+)", folder.name)
    if not match or match.group(1) != socket.gethostname():
        return False
    pid = int(match.group(2))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _read_state(folder: Path) -> dict | None:
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def adopt(out_dir: Path, tmp: Path, key: str) -> bool:
    """Remove the partial folders of dead builds of `out_dir` on this host, except one saved by a
    build with fingerprint `key`, which is renamed to `tmp` (True). Live builds' folders stay."""
    adopted = False
    for folder in _partial_dirs(out_dir):
        if folder == tmp or not _dead_here(folder, out_dir):
            continue
        state = _read_state(folder)
        if not adopted and state is not None and state.get("fingerprint") == key:
            shutil.rmtree(tmp, ignore_errors=True)
            os.replace(folder, tmp)
            adopted = True
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return adopted


def packing_from_start() -> dict:
    """The pack state of a build that has not packed anything yet."""
    return {"closed": 0, "piece": 0, "skip": 0,
            "totals": {"documents": 0, "tokens": 0, "sequences": 0, "dropped_tokens": 0}}


def closed_shards(pack: dict, shard_sequences: int) -> list[dict]:
    """The shards a pack state says are closed, as the manifest lists them."""
    return [{"file": f"shards/shard-{i:05d}.parquet", "sequences": shard_sequences} for i in range(pack["closed"])]


def _shards_intact(folder: Path, state: dict, shard_sequences: int) -> bool:
    """Every closed shard is there; the last one (the others were closed before it) is whole."""
    import pyarrow.parquet as pq

    try:
        shards = closed_shards(state["pack"], shard_sequences)
        if not all((folder / s["file"]).is_file() for s in shards):
            return False
        return not shards or pq.ParquetFile(folder / shards[-1]["file"]).metadata.num_rows == shard_sequences
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load(tmps: list[Path], key: str, shard_sequences: int) -> list[dict] | None:
    """Every volume's saved state when all of them have one of this build (`key`) whose closed
    shards are all there; the shard files they do not list (the one open when the build died) are
    removed. None when any is missing or does not fit: the caller starts over in emptied folders."""
    states = [_read_state(tmp) for tmp in tmps]
    if not all(s is not None and s.get("fingerprint") == key and (tmp / TOKENIZER).is_file()
               and _shards_intact(tmp, s, shard_sequences)
               for s, tmp in zip(states, tmps)):
        for tmp in tmps:
            for child in list(tmp.iterdir()) if tmp.exists() else []:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        return None
    for state, tmp in zip(states, tmps):
        listed = {shard["file"] for shard in closed_shards(state["pack"], shard_sequences)}
        for path in (tmp / "shards").glob("*.parquet") if (tmp / "shards").exists() else []:
            if f"shards/{path.name}" not in listed:
                path.unlink()
    return states


def finish(tmp: Path) -> None:
    """Remove what only a resumed build needs, before the manifest makes the build complete."""
    (tmp / STATE).unlink(missing_ok=True)
    (tmp / TOKENIZER).unlink(missing_ok=True)


def save(tmp: Path, state: dict) -> None:
    """Write `state` atomically: a build killed mid-write keeps the previous one."""
    write_atomic(tmp / STATE, json.dumps(state))
