"""One agent per pin root: an exclusive lock on the pin root, and a record of its owner.

Two agents on one pin root would each apply their own desired state to the same maps
and attachments (a second agent started by mistake, with an empty source, detached
every pod). The agent therefore holds an exclusive ``flock`` on the pin root directory
for as long as it runs: the lock lives in bpffs itself, so it is seen from every mount
namespace that sees the pins (a pod and the host alike), and the kernel drops it when
the process dies, however it dies. A second agent is refused with the owner named:

- the holder's pid comes from /proc/locks (the lock's inode), its command line from
  /proc/<pid>/cmdline (node, network namespace and sources are options of it);
- the owner's record (node, network namespace, sources, pid, start time) is also kept in
  its state directory as owner.json, mode 0600, for `cn2mirror doctor` and people.

Read-only commands (show, explain, doctor, capture) never take the lock.
`cn2mirror uninstall` takes it: it refuses while an agent runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field

OWNER_FILE = "owner.json"


class OwnedElsewhere(RuntimeError):
    """Another process holds the pin root."""


@dataclass
class OwnerRecord:
    node: str
    netns: str | None
    sources: list[str] = field(default_factory=list)
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    pin_root: str = ""


def _holder(path: str) -> int | None:
    """The pid holding a flock on ``path``, from /proc/locks."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4103 00:28:125040 0 EOF"
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
            with contextlib.suppress(ValueError):
                return int(parts[4])
    return None


def describe_holder(path: str) -> str:
    pid = _holder(path)
    if pid is None:
        return "another process (not visible from here)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return f"pid {pid}"
    return f"pid {pid}: {' '.join(argv)}" if argv else f"pid {pid}"


class PinRootLock:
    """Held while an agent runs; ``acquire`` raises OwnedElsewhere with the owner named."""

    def __init__(self, pin_root: str, state_dir: str | None = None):
        self.pin_root = pin_root.rstrip("/")
        self.state_dir = state_dir
        self._fd: int | None = None

    def acquire(self, record: OwnerRecord | None = None) -> PinRootLock:
        os.makedirs(self.pin_root, exist_ok=True)
        fd = os.open(self.pin_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OwnedElsewhere(
                f"{self.pin_root} is in use by another cn2mirror agent "
                f"({describe_holder(self.pin_root)}). One agent per node: stop that one "
                f"first, or give this one its own --pin-root.") from None
        self._fd = fd
        if record is not None and self.state_dir:
            record.pin_root = self.pin_root
            write_private_json(os.path.join(self.state_dir, OWNER_FILE), asdict(record))
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None
            if self.state_dir:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.state_dir, OWNER_FILE))

    @property
    def held(self) -> bool:
        return self._fd is not None


def in_use(pin_root: str) -> str | None:
    """None when no agent holds ``pin_root``, else who does (for read-only checks and
    uninstall, which take the lock only for a moment)."""
    if not os.path.isdir(pin_root):
        return None
    lock = PinRootLock(pin_root)
    try:
        lock.acquire()
    except OwnedElsewhere:
        return describe_holder(pin_root)
    lock.release()
    return None


def write_private_json(path: str, data: object) -> None:
    """Write a state file readable by its owner only (0600), atomically."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
