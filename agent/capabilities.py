"""This process's effective Linux capabilities (/proc/self/status CapEff), read once here
for every command that needs to know (``doctor``, ``show``)."""

from __future__ import annotations

import os

CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def effective() -> int | None:
    """The CapEff bit mask, or None when /proc/self/status cannot be read."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return None


def has(name: str, caps: int | None) -> bool:
    """Whether capability ``name`` (a key of CAPABILITIES) is in ``caps`` (effective())."""
    return caps is not None and bool(caps >> CAPABILITIES[name] & 1)


def may_use_bpf() -> bool:
    """Whether this process may use bpf() on pinned objects (CAP_BPF or CAP_SYS_ADMIN);
    root when the capabilities cannot be read."""
    caps = effective()
    if caps is None:
        return os.geteuid() == 0
    return has("CAP_BPF", caps) or has("CAP_SYS_ADMIN", caps)
