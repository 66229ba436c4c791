"""A Source (agent/runtime.py) that reads cluster objects from YAML files and directories.

``FileSource(paths)`` loads every given file, and every ``*.yaml``/``*.yml`` file under
the given directories (recursively, in name order), with agent.snapshot.load_paths, and
polls them: a file whose modification time, size, inode or change time differs, a new
file in a directory, a removed file, or a given path that appears or disappears makes it
reload. Changes are debounced: it loads once the files have stopped changing for
``settle`` seconds, so that an editor's save or a ``cp`` of many files gives one
snapshot. ``on_change`` is called only when the objects or the errors changed.

Errors (``errors``: agent.snapshot.LoadError, each naming file, document and reason) never
drop anything else: the other documents of the file and the other files are used. The
files stand in for the API server, and nothing is lost to a bad edit, as with it:
- a file that no longer parses as YAML, after it did, keeps its last good version in use
  until it parses again or is removed;
- an object the API server would refuse (agent/admission.py) is refused, with the API
  server's message, and its last accepted version from that file stays in use;
- a path given on the command line that does not exist refuses the start
  (``SourceError``); one that disappears later keeps what was last read from it in use
  (a file removed from a given directory is a deletion, as ``kubectl delete`` would be).
Each error says what stays in use.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from .defaults import DEFAULT_POLL_INTERVAL
from .snapshot import FIELDS, YAML_SUFFIXES, LoadError, Snapshot, identity, load_paths

log = logging.getLogger(__name__)

DEFAULT_SETTLE = 0.1

# A file's identity and version as stat() shows it.
Signature = tuple[int, int, int, int, int]


def _signature(path: str) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def list_files(paths: Iterable[str]) -> list[str]:
    """The files load_paths reads, in its order: given files as they are, directories'
    YAML files recursively in name order. Paths that do not exist are kept (load_paths
    reports them)."""
    out: list[str] = []
    for given in paths:
        if os.path.isdir(given):
            for root, dirs, files in os.walk(given):
                dirs.sort()
                out += [os.path.join(root, f) for f in sorted(files)
                        if f.endswith(YAML_SUFFIXES)]
        else:
            out.append(str(given))
    return out


@dataclass
class _Loaded:
    signature: Signature | None
    snapshot: Snapshot
    errors: list[LoadError]
    good: Snapshot | None  # from the last load in which every document parsed as YAML


class SourceError(ValueError):
    """The files cannot give a state to apply (a given path does not exist)."""


def _is_syntax_error(e: LoadError) -> bool:
    return e.reason.startswith("invalid YAML") or e.reason.startswith("cannot read")


class FileSource:
    """Cluster objects from YAML files; see the module documentation."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]],
                 poll_interval: float = DEFAULT_POLL_INTERVAL, settle: float = DEFAULT_SETTLE):
        self.paths = [str(Path(p)) for p in paths]
        if not self.paths:
            raise ValueError("FileSource needs at least one file or directory")
        missing = [p for p in self.paths if not os.path.exists(p)]
        if missing:
            raise SourceError("no such file or directory: " + ", ".join(missing) +
                              " (a source that does not exist would apply an empty state)")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.poll_interval = poll_interval
        self.settle = max(0.0, settle)
        self.errors: tuple[LoadError, ...] = ()
        self.snapshot: Snapshot | None = None
        self.loads = 0  # how many times the files were (re)loaded
        self._files: dict[str, _Loaded] = {}  # path -> its last load
        self._scan: dict[str, Signature | None] = {}
        self._on_change: Callable[[Snapshot], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ Source protocol
    def start(self, on_change: Callable[[Snapshot], None]) -> None:
        """Load everything, call on_change once (before returning), then poll."""
        if self._thread is not None:
            raise RuntimeError("FileSource already started")
        self._on_change = on_change
        self._stop.clear()
        self.reload()
        self._thread = threading.Thread(target=self._poll, name="cn2mirror-files",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._on_change = None

    def ready(self) -> bool:
        return self._ready

    # ------------------------------------------------------------------ loading
    def scan(self) -> dict[str, Signature | None]:
        """Every input file (and given path) with its stat signature."""
        found = {path: _signature(path) for path in list_files(self.paths)}
        for given in self.paths:  # a given path appearing or vanishing is a change too
            found.setdefault(given, _signature(given))
        return found

    def reload(self, scan: dict[str, Signature | None] | None = None) -> bool:
        """Load what changed since the last load; call on_change if the objects or the
        errors changed. Returns whether on_change was called."""
        with self._lock:
            scan = self.scan() if scan is None else scan
            files = list_files(self.paths)
            vanished: list[LoadError] = []
            keep: set[str] = set()  # files of given paths that are gone: kept as last read
            for given in self.paths:
                if scan.get(given) is None and not os.path.lexists(given):
                    kept = [f for f in self._files if f == given
                            or f.startswith(given.rstrip("/") + "/")]
                    keep.update(kept)
                    files = [f for f in files if f != given or f in kept]
                    files += [f for f in kept if f not in files]
                    vanished.append(LoadError(given, 0, "no such file or directory; the "
                                              f"{len(kept)} file(s) last read from it stay "
                                              "in use until it returns"))
            loaded: dict[str, _Loaded] = {}
            for path in files:
                sig = scan.get(path, _signature(path))
                old = self._files.get(path)
                if old is not None and (path in keep or (sig is not None and old.signature == sig)):
                    loaded[path] = old
                    continue
                loaded[path] = self._load(path, sig, old)
            self._files = loaded
            self._scan = scan
            self.loads += 1

            snapshot, errors = Snapshot(), list(vanished)
            for path in files:
                snapshot = snapshot.merged(loaded[path].snapshot)
                errors += loaded[path].errors
            changed = (not self._ready or snapshot != self.snapshot
                       or tuple(errors) != self.errors)
            self.snapshot, self.errors = snapshot, tuple(errors)
            callback = self._on_change
        if not changed:
            return False
        n = sum(len(v) for v in snapshot.by_kind().values())
        log.info("files: %d objects from %d files, %d load errors", n, len(files), len(errors))
        for e in errors:
            log.warning("  %s", e)
        self._ready = True
        if callback is not None:
            callback(snapshot)
        return True

    def _load(self, path: str, sig: Signature | None, old: _Loaded | None) -> _Loaded:
        snapshot, errors = load_paths([path])
        good = old.good if old is not None else None
        if any(_is_syntax_error(e) for e in errors):
            if good is None or sig is None:
                return _Loaded(sig, snapshot, errors, good=None)
            # Mid-edit or broken: the last version that parsed stays in use.
            kept = [replace(e, reason=f"{e.reason}; the file's last good version stays "
                            "in use") if _is_syntax_error(e) else e for e in errors]
            return _Loaded(sig, good, kept, good=good)
        # Objects the API server would refuse: their last accepted version stays.
        previous = {identity(o): (kind, o) for kind, objs in (good or Snapshot()).by_kind()
                    .items() for o in objs}
        restored: dict[str, list] = {f: [] for f in FIELDS.values()}
        out = []
        for e in errors:
            if e.rejected and e.rejected in previous:
                kind, obj = previous[e.rejected]
                restored[FIELDS[kind]].append(obj)
                e = replace(e, reason=f"{e.reason}; its last accepted version stays in use")
            out.append(e)
        snapshot = snapshot.merged(Snapshot(**{f: tuple(v) for f, v in restored.items()}))
        return _Loaded(sig, snapshot, out, good=snapshot)

    # ------------------------------------------------------------------ polling
    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                scan = self.scan()
                if scan == self._scan:
                    continue
                # Debounce: wait until the files stop changing (at most ~2 s).
                for _ in range(20):
                    if self._stop.wait(self.settle):
                        return
                    again = self.scan()
                    if again == scan:
                        break
                    scan = again
                self.reload(scan)
            except Exception:  # a filesystem hiccup must not end the polling
                log.exception("reloading the files failed")
