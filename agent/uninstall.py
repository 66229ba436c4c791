"""Remove every trace of cn2mirror from a node, then check that nothing is left.

What the agent leaves on a node outlives it on purpose (a restarted agent adopts it
without a gap): the classifier on each pod interface, the mirror port (a veth pair with
the wrapper and an XDP guard), the VXLAN device of static destinations, the pins under
the pin root (maps, programs and, with tcx, the links that hold the attachments) and the
state directory. Deleting the DaemonSet therefore does not stop the copies: this does.

Nothing here compiles or loads a program: uninstalling needs neither bcc nor headers.
Stop the agent first (a running agent would attach again at its next resync).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from .bpfsys import clear_directory
from .datapath import MIRROR_RX, MIRROR_TX, Datapath
from .discovery import VXLAN_DEVICE
from .netns import iproute
from .ownership import in_use

# The devices the agent creates, removed with it.
OWN_DEVICES = (MIRROR_TX, MIRROR_RX, VXLAN_DEVICE)


@dataclass
class UninstallReport:
    """What was removed and what is still there (``left`` empty: the node is clean)."""

    detached: list[str] = field(default_factory=list)  # interface names
    devices: list[str] = field(default_factory=list)
    pins: bool = False
    state_dir: bool = False
    left: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"detached": self.detached, "devices": self.devices, "pins_removed": self.pins,
                "state_dir_removed": self.state_dir, "left": self.left, "clean": not self.left}


def _ifnames(netns: str | None) -> dict[int, str]:
    ipr = iproute(netns)
    try:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    finally:
        ipr.close()


def _remove_devices(netns: str | None) -> list[str]:
    removed = []
    ipr = iproute(netns)
    try:
        for name in OWN_DEVICES:
            for idx in ipr.link_lookup(ifname=name):
                try:
                    ipr.link("del", index=idx)
                except Exception as e:  # the veth peer goes with its other end
                    if getattr(e, "code", None) != errno.ENODEV:
                        raise
                removed.append(name)
    finally:
        ipr.close()
    return removed


def _present(path: str) -> bool:
    """Something of ours is there (an emptied mount point is not)."""
    if not os.path.lexists(path):
        return False
    return not (os.path.ismount(path) and not os.listdir(path))


def leftovers(pin_root: str, state_dir: str | None, netns: str | None) -> list[str]:
    """Everything of cn2mirror still on the node, each said in a line."""
    left = []
    dp = Datapath(pin_root, netns)
    names = _ifnames(netns)
    for idx in sorted(dp.attached_ifindexes()):
        left.append(f"classifier still attached to {names.get(idx, idx)} (ifindex {idx})")
    for name in OWN_DEVICES:
        if name in names.values():
            left.append(f"device {name} still exists")
    if _present(pin_root):
        left.append(f"pins still under {pin_root}")
    if state_dir and _present(state_dir):
        left.append(f"state directory {state_dir} still has files")
    return left


class AgentRunning(RuntimeError):
    """An agent holds the pin root: it would attach again at its next resync."""


def uninstall(pin_root: str, state_dir: str | None = None,
              netns: str | None = None) -> UninstallReport:
    """Detach, remove the devices, unpin (which also releases tcx links), remove the state
    directory; then look again and report what is left. Refused while an agent runs."""
    holder = in_use(pin_root)
    if holder is not None:
        raise AgentRunning(f"an agent is running on {pin_root} ({holder}): stop it first "
                           "(in a cluster, delete the agent DaemonSet)")
    report = UninstallReport()
    dp = Datapath(pin_root, netns)
    names = _ifnames(netns)
    for idx in sorted(dp.attached_ifindexes()):
        dp.detach(idx)
        report.detached.append(names.get(idx, str(idx)))
    report.devices = _remove_devices(netns)
    report.pins = _present(pin_root) and clear_directory(pin_root)
    report.state_dir = bool(state_dir) and _present(state_dir) and clear_directory(state_dir)
    report.left = leftovers(pin_root, state_dir, netns)
    return report
