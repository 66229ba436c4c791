"""The agent's state directory: the files it writes there, and the one reader of them.

The agent (agent/runtime.py) writes, each atomically (write, then rename):

- ``names.json``: what every number in the pinned maps stands for (agent/node.py
  describe()): rule, destination and interface slots -> names, ids, problems;
- ``capture-names.json``: mirror/session ids -> names, the ``cn2mirror capture --names``
  format;
- ``status.json``: readiness, reconciles, problems (agent/runtime.py Agent.status()).

Everything that reads them (``cn2mirror show``/``ids``, ``show problems``, the agent's
/metrics) goes through :class:`Names` and :func:`read_status` here.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

NAMES_FILE = "names.json"
CAPTURE_NAMES_FILE = "capture-names.json"
STATUS_FILE = "status.json"
STATE_FILES = (NAMES_FILE, CAPTURE_NAMES_FILE, STATUS_FILE)

STATE_DIR_MODE = 0o700  # the state files name every pod, policy and analyzer: root only
STATE_FILE_MODE = 0o600


def private_dir(path: str) -> None:
    """Make ``path`` (and missing parents) a directory only its owner can read."""
    os.makedirs(path, mode=STATE_DIR_MODE, exist_ok=True)
    os.chmod(path, STATE_DIR_MODE)


def write_atomic(path: str, data: Any) -> None:
    """Write JSON to ``path`` so that readers see the old file or the new one, never half;
    readable by its owner only (STATE_FILE_MODE), in a directory of STATE_DIR_MODE."""
    directory = os.path.dirname(path) or "."
    private_dir(directory)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, STATE_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclass
class Names:
    """What the numbers in the maps stand for: <state dir>/names.json, when present.

    ``rules``, ``destinations`` and ``interfaces`` map a slot to the entry the agent
    wrote for it (a dict, as in the file); ``available`` is False (and ``reason`` says
    why) when there is no readable version 1 file. ``mismatches`` collects what a reader
    found that does not fit the maps (the agent changed the datapath since it wrote it).
    """

    path: str
    available: bool = False
    reason: str | None = None
    node: str | None = None
    rules: dict[int, dict] = field(default_factory=dict)
    destinations: dict[int, dict] = field(default_factory=dict)
    interfaces: dict[int, dict] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: str) -> Names:
        path = os.path.join(state_dir, NAMES_FILE)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return cls(path, reason=f"{path} does not exist (the agent writes it; is "
                                    "--state-dir the agent's?)")
        except (OSError, ValueError) as e:
            return cls(path, reason=f"cannot read {path}: {e}")
        if not isinstance(data, dict) or data.get("version") != 1:
            return cls(path, reason=f"{path} is not a version 1 names file")

        def slots(key: str) -> dict[int, dict]:
            out = {}
            for k, v in (data.get(key) or {}).items():
                try:
                    out[int(k)] = v if isinstance(v, dict) else {}
                except ValueError:
                    continue
            return out

        return cls(path, True, None, data.get("node"), slots("rules"), slots("destinations"),
                   slots("interfaces"), dict(data.get("problems") or {}))

    def mismatch(self, text: str) -> None:
        if text not in self.mismatches:
            self.mismatches.append(text)

    def as_json(self) -> dict:
        return {"available": self.available, "path": self.path, "reason": self.reason,
                "node": self.node, "problems": dict(self.problems),
                "mismatches": list(self.mismatches)}

    def rule(self, slot: int) -> dict:
        """The names of a rule slot (all None when unknown)."""
        n = self.rules.get(slot) or {}
        kind = None
        if n:
            kind = "port" if n.get("port_mirror") else "policy"
        return {"kind": kind, "policy": n.get("policy"), "rule": n.get("rule"),
                "port_mirror": n.get("port_mirror"), "direction": n.get("direction")}

    def dest_name(self, slot: int) -> str | None:
        return (self.destinations.get(slot) or {}).get("name") if slot else None

    def interface(self, ifslot: int) -> dict:
        return self.interfaces.get(ifslot) or {}


class NamesCache:
    """Names.load(state_dir), read again only when the file's mtime changed (/metrics
    reads it at every scrape)."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, NAMES_FILE)
        self._names = Names(self.path, reason="not read yet")
        self._mtime: float | None = None

    def get(self) -> Names:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return Names(self.path, reason=f"{self.path} does not exist")
        if mtime != self._mtime:
            names = Names.load(self.state_dir)
            if names.available:  # a half-readable file keeps the last good names
                self._names, self._mtime = names, mtime
            elif not self._names.available:
                self._names = names
        return self._names


class StateFileError(Exception):
    """A state file is missing or unreadable; the message says which and why."""


def read_status(state_dir: str) -> dict:
    """<state dir>/status.json as the agent wrote it (Agent.status())."""
    path = os.path.join(state_dir, STATUS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            status = json.load(f)
    except FileNotFoundError:
        raise StateFileError(f"{path} does not exist: is an agent running with "
                             f"--state-dir {state_dir}?") from None
    except (OSError, ValueError) as e:
        raise StateFileError(f"cannot read {path}: {e}") from None
    if not isinstance(status, dict):
        raise StateFileError(f"{path} is not a status file")
    return status
