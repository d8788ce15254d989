"""Downloads into a cache, one way for every file the study fetches, and the offline switch.

    from scaling_study.downloads import DownloadError, cache_root, fetch
    try:
        path = fetch("https://example.org/train.txt", cache_root() / "tasks" / "x" / "train.txt")
    except DownloadError as exc:
        exc.url, exc.reason, exc.offline        # the caller says what it was for, in its own message

`cache_root()` is this machine's cache, `$SCALING_STUDY_CACHE` (default `~/.cache/scaling-study`):
storage mirrors under `mirror/` (scaling_study.storage), task downloads under `tasks/`
(scaling_study.tasks.data). Corpus URLs are cached with the study, under `<storage.root>/cache`.

`fetch` writes under a temporary name in the destination's folder and renames it into place, so a
killed download is fetched again, never half-read; a file already there is not fetched again.
With `$SCALING_STUDY_OFFLINE=1` it refuses every download (corpus URLs, task splits) with a
`DownloadError` whose `offline` is true; `file://` URLs are local reads and still work. The switch
also turns on `HF_HUB_OFFLINE` (scaling_study/_env.py), so models load from the Hugging Face
cache only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ENV_CACHE = "SCALING_STUDY_CACHE"
ENV_OFFLINE = "SCALING_STUDY_OFFLINE"
TIMEOUT_S = 60


def cache_root() -> Path:
    """This machine's cache folder: `$SCALING_STUDY_CACHE`, or `~/.cache/scaling-study`."""
    return Path(os.environ.get(ENV_CACHE) or "~/.cache/scaling-study").expanduser().resolve()


def offline() -> bool:
    """`$SCALING_STUDY_OFFLINE` is set to anything but empty or 0."""
    return os.environ.get(ENV_OFFLINE, "") not in ("", "0")


class DownloadError(Exception):
    """A download that did not happen: `reason` says why (HTTP 404, connection refused, offline)."""

    def __init__(self, url: str, reason: str, *, offline: bool = False):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason, self.offline = url, reason, offline


def fetch(url: str, dest: Path, *, timeout: float = TIMEOUT_S) -> Path:
    """`url` as the file `dest`, downloaded unless it is there already; raises DownloadError."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    if offline() and urllib.parse.urlsplit(url).scheme.lower() != "file":
        raise DownloadError(url, f"not downloaded: ${ENV_OFFLINE}={os.environ[ENV_OFFLINE]}", offline=True)
    request = urllib.request.Request(url, headers={"User-Agent": "scaling-study"})
    part = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # URLs come from specs and task.yaml files, which name them on purpose
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part",
                                             delete=False) as out:
                part = Path(out.name)
                shutil.copyfileobj(response, out, 1 << 20)
        os.replace(part, dest)
    except BaseException as exc:
        if part is not None:
            part.unlink(missing_ok=True)
        if isinstance(exc, (urllib.error.URLError, OSError, ValueError)):  # HTTP errors are URLErrors
            raise DownloadError(url, str(_reason(exc))) from None
        raise
    return dest


def _reason(exc: Exception) -> object:
    if isinstance(exc, urllib.error.HTTPError):
        return exc  # "HTTP Error 404: Not Found"
    return getattr(exc, "reason", None) or exc
