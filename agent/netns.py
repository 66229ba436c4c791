"""Working inside a named network namespace from this process.

``ip netns exec`` would give a command a fresh /sys without our bpffs mount
(platform.md), so the agent stays in its own mount namespace and enters only the
network namespace, with setns, for the calls that are per-namespace: netlink sockets,
/proc/sys/net, XDP attachment by name, ifindex lookups.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator

NETNS_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # os.setns arrives only with Python 3.12; Debian 12 has 3.11.
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """Run the block in network namespace `netns` (None: where we are)."""
    if not netns:
        yield
        return
    path = os.path.join(NETNS_DIR, netns)
    if not os.path.exists(path):
        raise FileNotFoundError(f"network namespace {netns!r} does not exist ({path})")
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def iproute(netns: str | None):
    """A pyroute2 IPRoute socket bound to `netns` (sockets keep the namespace they were
    made in, so the caller can use it after leaving the namespace)."""
    from pyroute2 import IPRoute

    with entered(netns):
        return IPRoute()


def sysctl(netns: str | None, key: str, value: str | int) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    with entered(netns):
        with open(path, "w") as f:
            f.write(str(value))


def run(netns: str | None, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """A command in the namespace (for tools with no library API, such as ethtool)."""
    argv = (["nsenter", f"--net={NETNS_DIR}/{netns}"] if netns else []) + list(cmd)
    return subprocess.run(argv, check=check, capture_output=True, text=True)
