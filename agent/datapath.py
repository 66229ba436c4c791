"""Compiling, loading, pinning and attaching the BPF programs (the kernel side of a node).

A Datapath owns:
- the programs, compiled and loaded by a short-lived subprocess (agent/loader.py: bcc,
  LLVM and clang never enter the agent's own process), with every map and program pinned
  under the pin root, so that the CLI can read them and a restarted agent adopts them
  with no pause in mirroring; the agent opens the pins with libbpf (agent/bpfsys.py);
- the mirror port (a veth pair, see bpf/mirror_port.c) with its wrapper and XDP guard;
- the classifier's attachment to pod interfaces (clsact, first in the chain, passing on
  with TC_ACT_UNSPEC).

It does not decide what to mirror: agent/programmer.py writes the maps.
"""

from __future__ import annotations

import ctypes as C
import errno
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources

from . import layout
from .bpfsys import BpfMap, obj_get
from .netns import iproute, run, sysctl

log = logging.getLogger(__name__)

DEFAULT_PIN_ROOT = "/sys/fs/bpf/cn2mirror"
MIRROR_TX = "cn2m-tx"  # clones enter here; finished ones are wrapped on its TC egress
MIRROR_RX = "cn2m-rx"  # the rest (offloads off: the kernel segments them) wrapped here
MIRROR_MTU = 65535
TC_HANDLE = 0xC2  # our filter's handle, so that replace finds exactly ours
TC_PRIO = 1  # first in the chain
XDP_FLAGS_SKB_MODE = 2
TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
SOURCES = ("common.h", "classifier.c", "mirror_port.c")
# Every program: name -> bcc's program type (an attribute of bcc.BPF); each is pinned as
# <pin root>/prog_<name>.
PROGRAMS = {
    "classify_from_pod": "SCHED_CLS",
    "classify_to_pod": "SCHED_CLS",
    "eval_continue": "SCHED_CLS",
    "mirror_wrap": "SCHED_CLS",
    "mirror_wrap_inline": "SCHED_CLS",
    "analyzer_port_rx": "XDP",
}
LOAD_TIMEOUT = 300  # seconds for the loader subprocess (clang on a busy 2-core machine)


class DatapathError(RuntimeError):
    """A datapath operation failed; the message says what and how to fix it."""


def _diagnostics(stderr: str, limit: int = 40) -> str:
    """The compiler's messages from the loader's stderr: errors first, at most `limit`
    lines."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    shown = errors or lines[-limit:]
    return "\n".join(shown[:limit])


def bpf_source(pin_root: str, max_flow_dests: int) -> str:
    parts = [layout.c_declarations(pin_root, max_flow_dests)]
    pkg = resources.files("cn2mirror.bpf")
    for name in SOURCES:
        parts.append(f"/* ---- {name} ---- */\n" + (pkg / name).read_text())
    # The generated declarations use bcc's macros, so they must come after bcc's
    # headers: move the include block of common.h to the top.
    text = "\n".join(parts)
    includes = [line for line in text.splitlines() if line.startswith("#include")]
    body = [line for line in text.splitlines() if not line.startswith("#include")]
    return "\n".join(includes + body)


def prog_pin(pin_root: str, name: str) -> str:
    return f"{pin_root.rstrip('/')}/prog_{name}"


def ensure_bpffs(pin_root: str) -> None:
    """Mount bpffs on /sys/fs/bpf if it is not, and create the pin root."""
    if pin_root.startswith("/sys/fs/bpf") and not os.path.ismount("/sys/fs/bpf"):
        os.makedirs("/sys/fs/bpf", exist_ok=True)
        r = subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"],
                           capture_output=True, text=True)
        if r.returncode:
            raise DatapathError(f"cannot mount bpffs on /sys/fs/bpf: {r.stderr.strip()}")
    os.makedirs(pin_root, exist_ok=True)


@dataclass
class Attachment:
    ifname: str
    ifindex: int


class Datapath:
    """The programs and maps of one node (one network namespace)."""

    def __init__(self, pin_root: str = DEFAULT_PIN_ROOT, netns: str | None = None,
                 max_flow_dests: int = layout.DEFAULT_MAX_FLOW_DESTS):
        if not 1 <= max_flow_dests <= 32:
            raise DatapathError(f"max flow destinations must be 1..32, not {max_flow_dests}")
        self.pin_root = pin_root.rstrip("/")
        self.netns = netns
        self.max_flow_dests = max_flow_dests
        self.progs: dict[str, int] = {}  # name -> fd of the pinned program
        self.maps: dict[str, BpfMap] = {}
        self.mirror_tx_index = 0
        self.mirror_rx_index = 0

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        """Compile and load the programs (in a subprocess: agent/loader.py), creating or
        adopting the pinned maps; then open the pinned programs and maps."""
        ensure_bpffs(self.pin_root)
        argv = [sys.executable, "-m", "cn2mirror.agent.loader", "--pin-root", self.pin_root]
        if self.netns:
            argv += ["--netns", self.netns]
        try:
            r = subprocess.run(argv, input=bpf_source(self.pin_root, self.max_flow_dests),
                               capture_output=True, text=True, timeout=LOAD_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise DatapathError(f"loading the BPF programs took more than {LOAD_TIMEOUT} s "
                                "(python -m cn2mirror.agent.loader)") from e
        lines = r.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if lines else {}
        except ValueError:
            answer = {}
        if r.returncode or "programs" not in answer:
            why = answer.get("error") or f"the loader exited with status {r.returncode}"
            detail = _diagnostics(r.stderr)
            raise DatapathError(why + (f"\n{detail}" if detail else ""))
        self.close()
        try:
            for name in PROGRAMS:
                self.progs[name] = obj_get(prog_pin(self.pin_root, name))
            for spec in layout.map_specs(self.max_flow_dests):
                if spec.kind == "prog":
                    continue
                self.maps[spec.name] = BpfMap.pinned(f"{self.pin_root}/{spec.name}",
                                                     C.sizeof(spec.key), C.sizeof(spec.value),
                                                     percpu=spec.kind.startswith("percpu"))
        except BaseException as e:
            self.close()
            if isinstance(e, OSError):
                raise DatapathError(f"the loader's pins under {self.pin_root} cannot be "
                                    f"opened: {e}") from e
            raise

    def prog_fd(self, name: str) -> int:
        return self.progs[name]

    # ------------------------------------------------------------------ mirror port
    def setup_mirror_port(self) -> None:
        """Create (or adopt) the mirror veth pair and attach wrapper and XDP guard."""
        ipr = iproute(self.netns)
        try:
            if not ipr.link_lookup(ifname=MIRROR_TX):
                ipr.link("add", ifname=MIRROR_TX, kind="veth", peer=MIRROR_RX)
            tx = ipr.link_lookup(ifname=MIRROR_TX)[0]
            rx = ipr.link_lookup(ifname=MIRROR_RX)[0]
            for idx, name in ((tx, MIRROR_TX), (rx, MIRROR_RX)):
                # No addresses, no ARP, no IPv6 autoconfiguration: the port sends nothing
                # of its own. Both ends run the wrapper (tx inline on egress, rx on
                # ingress): forwarding on for its FIB lookups.
                sysctl(self.netns, f"net.ipv6.conf.{name}.addr_gen_mode", 1)
                sysctl(self.netns, f"net.ipv6.conf.{name}.accept_ra", 0)
                ipr.link("set", index=idx, mtu=MIRROR_MTU)
            # IFF_NOARP on, IFF_MULTICAST off: no ARP, IGMP or MLD of the port's own.
            for idx in (tx, rx):
                ipr.link("set", index=idx, flags=0x80, change=0x80 | 0x1000)
            # Neither end needs IPv6 addresses (the FIB helper needs only forwarding on):
            # without it they send no MLD reports of their own.
            for name in (MIRROR_TX, MIRROR_RX):
                sysctl(self.netns, f"net.ipv6.conf.{name}.disable_ipv6", 1)
            for name in (MIRROR_TX, MIRROR_RX):
                sysctl(self.netns, f"net.ipv4.conf.{name}.forwarding", 1)
                sysctl(self.netns, f"net.ipv6.conf.{name}.forwarding", 1)
            # Copies a destination wants whole are handed to the IP stack on the far end
            # to be forwarded and fragmented: they come from this node's own address.
            sysctl(self.netns, f"net.ipv4.conf.{MIRROR_RX}.accept_local", 1)
            sysctl(self.netns, f"net.ipv4.conf.{MIRROR_RX}.rp_filter", 0)
            ipr.link("set", index=tx, state="up")
            ipr.link("set", index=rx, state="up")
        finally:
            ipr.close()
        # The kernel segments and checksums clones on the sending end: plain super-packets
        # and, above all, the ones wrapped once as UDP-tunnel GSO packets (tunnel
        # segmentation off: wire-size wrapped segments leave the port whatever the next
        # hop is; a veth there would pass the 64 KB skb on whole).
        r = run(self.netns, "ethtool", "-K", MIRROR_TX, "tso", "off", "gso", "off",
                "tx", "off", "sg", "off", "gro", "off", "tx-udp_tnl-segmentation", "off",
                "tx-udp_tnl-csum-segmentation", "off", check=False)
        if r.returncode:
            raise DatapathError(f"ethtool -K {MIRROR_TX} failed: {r.stderr.strip()}")
        run(self.netns, "ethtool", "-K", MIRROR_RX, "gro", "off", "tso", "off",
            "gso", "off", check=False)
        self.mirror_tx_index, self.mirror_rx_index = tx, rx
        self._attach_tc(rx, "mirror_wrap", TC_INGRESS)
        self._attach_tc(tx, "mirror_wrap_inline", TC_EGRESS)
        self.attach_xdp(tx, "analyzer_port_rx")

    def set_gso_handoff(self, ifindex: int, on: bool) -> bool:
        """Make a local analyzer pod's host-side veth segment UDP-tunnel GSO packets and
        finish their checksums in software (on), so that a super-packet wrapped once can
        be handed to it directly; or give it its offloads back (off). True when done."""
        state = "off" if on else "on"
        try:
            name = self._ifname(ifindex)
        except DatapathError:
            return False
        r = run(self.netns, "ethtool", "-K", name, "tx-udp_tnl-segmentation", state,
                "tx-udp_tnl-csum-segmentation", state, "tx", state, check=False)
        if r.returncode:
            log.warning("ethtool -K %s (copy hand-off %s) failed: %s", name,
                        "on" if on else "off", r.stderr.strip())
        return r.returncode == 0

    def _ifname(self, ifindex: int) -> str:
        ipr = iproute(self.netns)
        try:
            links = ipr.get_links(ifindex)
        except Exception as e:
            raise DatapathError(f"no interface with index {ifindex}") from e
        finally:
            ipr.close()
        return links[0].get_attr("IFLA_IFNAME")

    def teardown_mirror_port(self) -> None:
        ipr = iproute(self.netns)
        try:
            for idx in ipr.link_lookup(ifname=MIRROR_TX):
                ipr.link("del", index=idx)
        finally:
            ipr.close()

    def attach_xdp(self, ifindex: int, prog: str) -> None:
        """Attach (or replace in place) an XDP program, in generic (skb) mode, by netlink."""
        ipr = iproute(self.netns)
        try:
            ipr.link("set", index=ifindex, xdp={"attrs": [
                ("IFLA_XDP_FD", self.prog_fd(prog)), ("IFLA_XDP_FLAGS", XDP_FLAGS_SKB_MODE)]})
        except Exception as e:
            raise DatapathError(f"attaching {prog} (XDP) to ifindex {ifindex} failed: "
                                f"{e}") from e
        finally:
            ipr.close()

    # ------------------------------------------------------------------ pod interfaces
    def _attach_tc(self, ifindex: int, prog: str, parent: str) -> None:
        ipr = iproute(self.netns)
        try:
            try:
                ipr.tc("add", "clsact", ifindex)
            except Exception as e:  # already there (ours or the CNI's): fine
                if getattr(e, "code", None) != errno.EEXIST:
                    raise
            ipr.tc("replace-filter", "bpf", ifindex, TC_HANDLE, fd=self.prog_fd(prog),
                   name=prog, parent=parent, classid=1, direct_action=True, prio=TC_PRIO,
                   protocol=0x0003)  # ETH_P_ALL
        finally:
            ipr.close()

    def _detach_tc(self, ifindex: int, parent: str) -> None:
        ipr = iproute(self.netns)
        try:
            ipr.tc("del-filter", "bpf", ifindex, TC_HANDLE, parent=parent, prio=TC_PRIO,
                   protocol=0x0003)
        except Exception as e:
            if getattr(e, "code", None) not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise
        finally:
            ipr.close()

    def ifindex(self, ifname: str) -> int:
        ipr = iproute(self.netns)
        try:
            found = ipr.link_lookup(ifname=ifname)
        finally:
            ipr.close()
        if not found:
            where = f" in network namespace {self.netns}" if self.netns else ""
            raise DatapathError(f"unknown interface {ifname!r}{where}")
        return found[0]

    def attach(self, ifname: str) -> Attachment:
        """Attach the classifier to both directions of a pod's host-side interface.
        Either both directions are attached or neither is."""
        return self.attach_index(self.ifindex(ifname), ifname)

    def attach_index(self, idx: int, ifname: str = "") -> Attachment:
        self._attach_tc(idx, "classify_from_pod", TC_INGRESS)
        try:
            self._attach_tc(idx, "classify_to_pod", TC_EGRESS)
        except Exception as e:
            self._detach_tc(idx, TC_INGRESS)
            raise DatapathError(f"attaching to {ifname or idx} failed: {e}") from e
        return Attachment(ifname, idx)

    def detach(self, ifindex: int) -> None:
        self._detach_tc(ifindex, TC_INGRESS)
        self._detach_tc(ifindex, TC_EGRESS)

    def attached_ifindexes(self) -> set[int]:
        """Interfaces that carry our classifier (found by our filter handle)."""
        ipr = iproute(self.netns)
        found = set()
        try:
            for link in ipr.get_links():
                idx = link["index"]
                if idx in (self.mirror_rx_index, self.mirror_tx_index):
                    continue
                try:
                    filters = ipr.get_filters(index=idx, parent=TC_INGRESS)
                except Exception:
                    continue
                for f in filters:  # tcm_info holds the priority in its upper 16 bits
                    if f.get_attr("TCA_KIND") == "bpf" and f["info"] >> 16 == TC_PRIO and \
                            f["handle"] == TC_HANDLE:
                        found.add(idx)
        finally:
            ipr.close()
        return found

    # ------------------------------------------------------------------ removal
    def remove_pins(self) -> None:
        """Unpin everything under the pin root (the agent's `--cleanup`)."""
        if not os.path.isdir(self.pin_root):
            return
        for name in os.listdir(self.pin_root):
            os.unlink(os.path.join(self.pin_root, name))
        os.rmdir(self.pin_root)

    def close(self) -> None:
        """Close our descriptors of the programs and maps (the pins keep them)."""
        for fd in [*self.progs.values(), *(m.fd for m in self.maps.values())]:
            os.close(fd)
        self.progs.clear()
        self.maps.clear()
