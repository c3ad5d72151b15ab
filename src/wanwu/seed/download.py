"""A small client for ModelScope's public file API: list a revision's files, download them verified.

What ``modelscope.snapshot_download`` does, without the ``modelscope`` package:

* ``GET {ep}/api/v1/models/{id}/revisions`` → ``Data.RevisionMap.Branches/Tags[].Revision``;
* ``GET {ep}/api/v1/models/{id}/repo/files?Revision=R&Recursive=True`` → ``Data.Files[]`` with
  ``Path, Type, Size, Sha256``;
* ``GET {ep}/api/v1/models/{id}/repo?Revision=R&FilePath=P`` → the bytes (``Range`` resumes).

Each file streams into ``NAME.part`` beside its destination (kept on failure, resumed next time), is checked
against the listed size and sha256, then moved into place with :func:`os.replace`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from wanwu import __version__
from wanwu.errors import DownloadError, ModelError

DEFAULT_ENDPOINT = "https://www.modelscope.cn"
CHUNK = 1 << 20
ATTEMPTS = 3  # a dropped connection resumes from what arrived, this many times per file


def endpoint() -> str:
    return (os.environ.get("WANWU_MODELSCOPE_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str


class ModelScopeClient:
    """One model id on one endpoint. Use as a context manager (it owns an :class:`httpx.Client`)."""

    def __init__(self, model_id: str, base: str | None = None, timeout: float = 30.0) -> None:
        self.model_id = model_id
        self.base = (base or endpoint()).rstrip("/")
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, read=max(timeout, 60.0)),
            follow_redirects=True,
            headers={"User-Agent": f"wanwu/{__version__}"},
        )

    def __enter__(self) -> ModelScopeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    # -- metadata -------------------------------------------------------------------------------------

    def revisions(self) -> list[str]:
        data = self._json(f"/api/v1/models/{self.model_id}/revisions", {})
        rmap = data.get("RevisionMap") or {}
        out = []
        for kind in ("Branches", "Tags"):
            for entry in rmap.get(kind) or []:
                if isinstance(entry, dict) and isinstance(entry.get("Revision"), str):
                    out.append(entry["Revision"])
        return out

    def files(self, revision: str) -> list[RemoteFile]:
        data = self._json(
            f"/api/v1/models/{self.model_id}/repo/files", {"Revision": revision, "Recursive": "True"}
        )
        out = []
        for entry in data.get("Files") or []:
            if not isinstance(entry, dict) or entry.get("Type") == "tree":
                continue
            try:
                out.append(RemoteFile(str(entry["Path"]), int(entry["Size"]), str(entry.get("Sha256") or "")))
            except (KeyError, TypeError, ValueError):
                raise DownloadError(f"{self._where()}: malformed file entry {entry!r}") from None
        return out

    def _json(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        url = self.base + path
        try:
            response = self._http.get(url, params=params)
        except httpx.HTTPError as e:
            raise DownloadError(f"cannot reach ModelScope at {self.base}: {type(e).__name__}: {e}") from None
        if response.status_code == 404:
            raise DownloadError(f"model {self.model_id!r} not found on {self.base} (HTTP 404)")
        if response.status_code != 200:
            raise DownloadError(f"{url}: HTTP {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise DownloadError(f"{url}: the answer is not JSON") from None
        data = body.get("Data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            message = body.get("Message") if isinstance(body, dict) else None
            raise DownloadError(f"{url}: no Data in the answer ({message or 'unexpected format'})")
        return data

    def _where(self) -> str:
        return f"{self.base} {self.model_id}"

    # -- files ----------------------------------------------------------------------------------------

    def download(self, remote: RemoteFile, revision: str, dest: Path, progress: _Progress) -> None:
        """Fetch ``remote`` to ``dest`` (resuming ``dest.part``), verify size and sha256, place atomically.

        Processes on one machine downloading the same file take turns (a ``filelock`` beside it): one writes
        ``.part``, the others then find the verified file in place and do not fetch it again."""
        from filelock import FileLock

        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(dest) + ".lock"):
            if dest.exists() and dest.stat().st_size == remote.size and (
                    not remote.sha256 or sha256_file(dest) == remote.sha256):
                return
            self._download_locked(remote, revision, dest, progress)

    def _download_locked(self, remote: RemoteFile, revision: str, dest: Path, progress: _Progress) -> None:
        part = dest.with_name(dest.name + ".part")
        url = f"{self.base}/api/v1/models/{self.model_id}/repo"
        params = {"Revision": revision, "FilePath": remote.path}
        task = progress.add(remote.path, remote.size)
        for attempt in range(1, ATTEMPTS + 1):
            have = part.stat().st_size if part.exists() else 0
            if have > remote.size:
                part.unlink()
                have = 0
            if have == remote.size:
                break
            try:
                self._stream(url, params, part, have, progress, task)
                break
            except httpx.TransportError as e:
                if attempt == ATTEMPTS:
                    raise DownloadError(
                        f"downloading {remote.path} failed after {ATTEMPTS} attempts: {e}; run again to "
                        f"resume from {part.stat().st_size if part.exists() else 0} bytes"
                    ) from None
        _verify(part, remote)
        os.replace(part, dest)
        progress.done(task)

    def _stream(
        self, url: str, params: dict[str, str], part: Path, have: int, progress: _Progress, task: int
    ) -> None:
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self._http.stream("GET", url, params=params, headers=headers) as response:
            if response.status_code == 416 and have:  # nothing left to send: verification decides
                return
            if response.status_code not in (200, 206):
                raise DownloadError(f"{params['FilePath']}: HTTP {response.status_code} from {url}")
            resumed = have > 0 and response.status_code == 206
            if not resumed:
                have = 0
            progress.update(task, have)
            with part.open("ab" if resumed else "wb") as f:
                for block in response.iter_bytes(CHUNK):
                    f.write(block)
                    have += len(block)
                    progress.update(task, have)


def _verify(part: Path, remote: RemoteFile) -> None:
    size = part.stat().st_size
    if size != remote.size:
        part.unlink()
        raise DownloadError(f"{remote.path}: got {size} bytes, ModelScope lists {remote.size}; deleted it")
    if remote.sha256:
        digest = sha256_file(part)
        if digest.lower() != remote.sha256.lower():
            part.unlink()
            raise DownloadError(
                f"{remote.path}: sha256 {digest} does not match ModelScope's {remote.sha256}; deleted it"
            )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


class _Progress:
    """A rich download bar on stderr, only when stderr is a terminal."""

    def __init__(self, title: str) -> None:
        self._bar: Any = None
        self._totals: dict[int, int] = {}
        if not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            TextColumn(f"[bold]下载 {title}[/bold] {{task.description}}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
        )
        self._bar.start()

    def add(self, name: str, total: int) -> int:
        if self._bar is None:
            return 0
        task = int(self._bar.add_task(name, total=total))
        self._totals[task] = total
        return task

    def update(self, task: int, completed: int) -> None:
        if self._bar is not None:
            self._bar.update(task, completed=completed)

    def done(self, task: int) -> None:
        if self._bar is not None:
            self._bar.update(task, completed=self._totals.get(task, 0))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def progress(title: str) -> _Progress:
    return _Progress(title)


def offline() -> bool:
    return os.environ.get("WANWU_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def require_online(what: str, hint: str) -> None:
    if offline():
        raise ModelError(f"{what}, and WANWU_OFFLINE is set, so wanwu will not download it. {hint}")
