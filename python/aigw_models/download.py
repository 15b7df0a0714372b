"""Downloading a model's files into MODEL_PATH: resumable, verified, atomic.

A download fetches a list of files (``{url, name, sha256?}``) for a model
folder ``<MODEL_PATH>/<model>``:

* Files are written to a staging folder ``<MODEL_PATH>/.download-<model>/``
  as ``<name>.part``. An interrupted download resumes: the next attempt asks
  for ``Range: bytes=<size of .part>-`` and appends if the server answers
  206; a 200 (server without ranges) starts the file over.
* When a ``sha256`` is given the file's digest is checked (over the whole
  file, resumed parts included); a mismatch deletes the part and fails the
  download with a clear error.
* A finished file is renamed from ``.part`` to its name; when all files are
  there the staging folder is renamed to the model folder in one step (or,
  if the model folder exists already, each file is renamed into it), so a
  model never appears half-written.

Progress is readable at any time from ``view()``; the work runs in one
background thread. Before fetching, a HEAD request per file learns its size
(Content-Length, after redirects), so ``bytes_total`` is the size of the
whole download from the start and ``fraction`` is ``bytes_done /
bytes_total``. When a size cannot be learnt up front (HEAD refused, no
Content-Length) the fraction is estimated per file; either way the
published ``fraction`` never decreases (a value lower than one already
published is not shown), and it is 1.0 only when the model is installed.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

FILES_MAX = 64
CHUNK = 256 * 1024
TIMEOUT_S = 30
HEAD_TIMEOUT_S = 10
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class DownloadError(Exception):
    """A bad download request or a failed transfer."""


@dataclass
class FileSpec:
    url: str
    name: str
    sha256: Optional[str] = None


def _safe_name(name: str) -> str:
    norm = posixpath.normpath(name)
    if (not name or norm.startswith(("/", "../")) or norm in (".", "..") or "\\" in name
            or any(part.startswith(".") for part in norm.split("/"))):
        raise DownloadError(f"bad file name {name!r}")
    return norm


def parse_files(body: Dict[str, Any]) -> List[FileSpec]:
    """Files from a download request: ``files`` (a list of {url, name?,
    sha256?}) or a single ``url`` (+ ``name``, ``sha256``). A missing name
    is the last segment of the URL path."""
    raw = body.get("files")
    if raw is None and isinstance(body.get("url"), str):
        raw = [{"url": body["url"], "name": body.get("name"), "sha256": body.get("sha256")}]
    if not isinstance(raw, list) or not raw:
        raise DownloadError("download needs files: [{url, name, sha256?}] or url")
    if len(raw) > FILES_MAX:
        raise DownloadError(f"at most {FILES_MAX} files")
    out: List[FileSpec] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            raise DownloadError(f"files[{i}] needs a url")
        url = item["url"]
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise DownloadError(f"files[{i}]: only http(s) URLs are supported")
        name = item.get("name") or posixpath.basename(parsed.path)
        if not isinstance(name, str):
            raise DownloadError(f"files[{i}]: name must be a string")
        sha = item.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not _HEX64.match(sha)):
            raise DownloadError(f"files[{i}]: sha256 must be 64 hex digits")
        out.append(FileSpec(url, _safe_name(name), sha.lower() if sha else None))
    if len({f.name for f in out}) != len(out):
        raise DownloadError("file names must be unique")
    return out


class Download:
    """One model's download, run in a background thread."""

    def __init__(self, root: str, folder: str, files: List[FileSpec]) -> None:
        self.root = root
        self.folder = folder
        self.files = files
        self.staging = os.path.join(root, f".download-{folder}")
        self.target = os.path.join(root, folder)
        self.state = "queued"  # queued, running, done, error
        self.error: Optional[str] = None
        self.bytes_done = 0
        #  Sum of the file sizes: from HEAD up front, corrected by each GET's
        #  Content-Length; None for a file whose size is not known.
        self.bytes_total = 0
        self.sizes: Dict[str, Optional[int]] = {f.name: None for f in files}
        self.files_done = 0
        self._file_done = 0  # bytes of the current file so far
        self._published = 0.0  # the highest fraction shown (never goes back)
        self.current: Optional[str] = None
        self.resumed_bytes = 0  # bytes not fetched again thanks to Range
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def view(self) -> Dict[str, Any]:
        with self._lock:
            return {"state": self.state, "error": self.error, "bytes_done": self.bytes_done,
                    "bytes_total": self.bytes_total, "files_done": self.files_done,
                    "files_total": len(self.files), "current": self.current,
                    "resumed_bytes": self.resumed_bytes, "fraction": self._fraction()}

    def fraction(self) -> float:
        """Progress 0..1, monotonic; 1.0 only when installed."""
        with self._lock:
            return self._fraction()

    def _fraction(self) -> float:
        if self.state == "done":
            self._published = 1.0
            return 1.0
        n = max(1, len(self.files))
        if self.bytes_total and all(v is not None for v in self.sizes.values()):
            raw = self.bytes_done / self.bytes_total
        else:
            #  A size unknown: each file counts 1/n, the current one by its
            #  bytes when its size is known.
            raw = self.files_done / n
            size = self.sizes.get(self.current or "")
            if self.files_done < len(self.files) and size:
                raw += min(1.0, self._file_done / size) / n
        self._published = max(self._published, min(0.999, raw))
        return self._published

    def _set_size(self, name: str, size: Optional[int]) -> None:
        """Record a file's size (lock held) and recompute bytes_total."""
        self.sizes[name] = size
        self.bytes_total = sum(v for v in self.sizes.values() if v is not None)

    def _probe_sizes(self) -> None:
        """HEAD every file for its size; failures leave it unknown (the GET
        decides whether the download works)."""
        for spec in self.files:
            final = os.path.join(self.staging, spec.name)
            size: Optional[int] = None
            if os.path.exists(final):
                size = os.path.getsize(final)
            else:
                request = urllib.request.Request(
                    spec.url, method="HEAD", headers={"User-Agent": "aigw-model-worker"})
                try:
                    with urllib.request.urlopen(request, timeout=HEAD_TIMEOUT_S) as resp:
                        length = resp.headers.get("Content-Length")
                        if resp.status == 200 and length is not None and length.isdigit():
                            size = int(length)
                except (urllib.error.URLError, OSError, ValueError):
                    size = None
            with self._lock:
                self._set_size(spec.name, size)

    def start(self, on_progress: Callable[[float], None],
              on_done: Callable[[bool, Optional[str]], None]) -> None:
        def work() -> None:
            try:
                self.run(on_progress)
            except Exception as exc:  # noqa: BLE001 — reported, never raised
                with self._lock:
                    self.state, self.error = "error", str(exc)
                on_done(False, str(exc))
                return
            on_done(True, None)
        self._thread = threading.Thread(target=work, name=f"download-{self.folder}",
                                        daemon=True)
        self._thread.start()

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self, on_progress: Callable[[float], None] = lambda f: None) -> None:
        """Download every file, verify, and move the folder into place.
        Raises DownloadError."""
        with self._lock:
            self.state = "running"
        os.makedirs(self.staging, exist_ok=True)
        self._probe_sizes()
        for spec in self.files:
            with self._lock:
                self.current, self._file_done = spec.name, 0
            self._fetch(spec, on_progress)
            with self._lock:
                self.files_done += 1
            on_progress(self.fraction())
        self._install()
        with self._lock:
            self.state, self.current = "done", None
        on_progress(1.0)

    def _fetch(self, spec: FileSpec, on_progress: Callable[[float], None]) -> None:
        final = os.path.join(self.staging, spec.name)
        part = final + ".part"
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.exists(final) and (spec.sha256 is None or _sha256(final) == spec.sha256):
            size = os.path.getsize(final)
            with self._lock:
                self.bytes_done += size
                self._file_done = size
                self._set_size(spec.name, size)
                self.resumed_bytes += size
            return
        offset = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(spec.url, headers={"User-Agent": "aigw-model-worker"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        try:
            resp = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # the part is already complete
                resp = None
                with self._lock:
                    self.resumed_bytes += offset
                    self.bytes_done += offset
                    self._file_done = offset
                    self._set_size(spec.name, offset)
            else:
                raise DownloadError(f"{spec.url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise DownloadError(f"{spec.url}: {getattr(exc, 'reason', exc)}") from None
        if resp is not None:
            with resp:
                status = resp.status
                if status == 206 and offset:
                    mode = "ab"
                    with self._lock:
                        self.resumed_bytes += offset
                        self.bytes_done += offset
                        self._file_done = offset
                elif status == 200:
                    mode, offset = "wb", 0
                else:
                    raise DownloadError(f"{spec.url}: unexpected HTTP {status}")
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit():
                    with self._lock:
                        self._set_size(spec.name, offset + int(length))
                with open(part, mode) as fh:
                    while True:
                        try:
                            chunk = resp.read(CHUNK)
                        except OSError as exc:
                            raise DownloadError(f"{spec.url}: {exc}") from None
                        if not chunk:
                            break
                        fh.write(chunk)
                        with self._lock:
                            self.bytes_done += len(chunk)
                            self._file_done += len(chunk)
                        on_progress(self.fraction())
                if length is not None and length.isdigit() and \
                        os.path.getsize(part) != offset + int(length):
                    raise DownloadError(f"{spec.url}: connection closed early "
                                        f"({os.path.getsize(part)} of {offset + int(length)} "
                                        f"bytes; retry to resume)")
        if spec.sha256 is not None:
            digest = _sha256(part)
            if digest != spec.sha256:
                os.unlink(part)
                raise DownloadError(f"{spec.name}: sha256 mismatch (got {digest}, "
                                    f"expected {spec.sha256})")
        os.replace(part, final)

    def _install(self) -> None:
        if not os.path.exists(self.target):
            os.rename(self.staging, self.target)
            return
        for spec in self.files:
            dest = os.path.join(self.target, spec.name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(os.path.join(self.staging, spec.name), dest)
        shutil.rmtree(self.staging, ignore_errors=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
