"""Compiling, loading, pinning and attaching the BPF programs (the kernel side of a node).

A Datapath owns:
- the programs, compiled and loaded by a short-lived subprocess (agent/loader.py: bcc,
  LLVM and clang never enter the agent's own process), with every map and program pinned
  under the pin root, so that the CLI can read them and a restarted agent adopts them
  with no pause in mirroring; the agent opens the pins with libbpf (agent/bpfsys.py);
- the mirror port (a veth pair, see bpf/mirror_port.c) with its wrapper and XDP guard;
- the classifier's attachment to pod interfaces, first in the chain and passing on with
  TC_ACT_UNSPEC (= TCX_NEXT) so that the CNI's own programs run after it: a tcx link at
  the head of each direction's chain where the kernel has tcx (Linux >= 6.6), pinned
  under the pin root (<pin root>/link_tcx_<ifindex>_<in|eg>) so that it outlives the
  agent, its program replaced in place (BPF_LINK_UPDATE) by a restarted agent; else
  (or with attach mode "legacy") a clsact filter at priority 1. tcx programs run before
  every legacy filter, and a CNI that deletes the legacy filters (Cilium >= 1.16 does)
  cannot delete a link it does not hold.

It does not decide what to mirror: agent/programmer.py writes the maps.
"""

from __future__ import annotations

import ctypes as C
import errno
import hashlib
import json
import logging
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources

from . import bpfsys, layout
from .bpfsys import BpfError, BpfMap, obj_get, obj_pin
from .netns import NETNS_DIR, entered, iproute, run, sysctl

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
# The entry files (bpf/), compiled as one unit: they share the maps of bpf/gen/layout.h.
SOURCES = ("classifier.c", "mirror_port.c")
# Every program: name -> bcc's program type (an attribute of bcc.BPF); each is pinned as
# <pin root>/prog_<name>.
PROGRAMS = {
    "classify_from_pod": "SCHED_CLS",
    "classify_to_pod": "SCHED_CLS",
    "eval_continue": "SCHED_CLS",
    "mirror_wrap": "SCHED_CLS",
    "mirror_wrap_inline": "SCHED_CLS",
    "analyzer_port_rx": "XDP",
    # The pod-side attachment (see Datapath._attach_pod_side).
    "classify_to_pod_peer": "SCHED_CLS",
    "classify_from_pod_peer": "SCHED_CLS",
}
# How the classifier is attached to pod interfaces: "auto" (tcx when the kernel has it,
# else legacy clsact), "tcx" or "legacy"; the environment variable overrides "auto" (so
# that the legacy fallback can be forced, and tested, on a kernel with tcx).
ATTACH_MODES = ("auto", "tcx", "legacy")
ATTACH_MODE_ENV = "CN2MIRROR_ATTACH_MODE"
# Directions of a pod's host-side interface: (name, our program, tcx attach type, legacy
# parent). Ingress of the host side is traffic from the pod.
DIRECTIONS = (("in", "classify_from_pod", bpfsys.BPF_TCX_INGRESS, TC_INGRESS),
              ("eg", "classify_to_pod", bpfsys.BPF_TCX_EGRESS, TC_EGRESS))
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


def bpf_dir() -> str:
    """The C tree (bpf/: entry files, lib/, gen/layout.h), as installed with the package."""
    return str(resources.files("cn2mirror.bpf"))


def scratch_digest(max_flow_dests: int) -> str:
    """A digest of what the layout of the rule walk's scratch area depends on: the C
    structs it is made of, in bpf/gen/layout.h (from agent/layout.py), and the sizes."""
    text = (resources.files("cn2mirror.bpf") / layout.GENERATED_HEADER).read_text()
    structs = re.findall(r"^struct (?:flow_key|parsed|eval_scratch) \{.*?^\};", text,
                         re.S | re.M)
    basis = "\n".join(structs) + f"{max_flow_dests} {layout.SUMMARY_WORDS}"
    return hashlib.sha256(basis.encode()).hexdigest()[:12]


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def load_time_defines(pin_root: str, max_flow_dests: int) -> dict[str, str]:
    """The values bpf/gen/layout.h leaves to load time (layout.LOAD_TIME_DEFINES)."""
    return {
        "CN2M_PIN_ROOT": _c_string(pin_root.rstrip("/")),
        "MAX_FLOW_DESTS": str(max_flow_dests),
        "CN2M_SCRATCH_DIGEST": _c_string(scratch_digest(max_flow_dests)),
        "FLOW_TABLE_SIZE": str(layout.FLOW_TABLE_SIZE),
    }


_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def inline_includes(text: str, root: str, name: str = "unit.c",
                    seen: set[str] | None = None) -> str:
    """``text`` with every ``#include "..."`` of the tree under ``root`` replaced by the
    file's text, recursively, each file once (the headers have include guards too).

    bcc rewrites map calls (``flows.lookup(&k)``) and finds programs only in the main
    file it is given, not in the files that file includes: the tree is therefore handed
    to it as one text. ``#line`` directives keep the compiler's messages pointing at the
    files and lines under bpf/. Includes of <system> headers stay as they are."""
    seen = set() if seen is None else seen
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        m = _QUOTED_INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        rel = m.group(1)
        path = os.path.normpath(os.path.join(root, rel))
        if not os.path.isfile(path):
            raise DatapathError(f"{name}:{number}: #include \"{rel}\": no such file under "
                                f"{root}")
        if rel not in seen:
            seen.add(rel)
            with open(path) as f:
                inner = f.read()
            out.append(f'#line 1 "{rel}"')
            out.append(inline_includes(inner, root, rel, seen))
        out.append(f'#line {number + 1} "{name}"')
    return "\n".join(out)


def bpf_source(pin_root: str, max_flow_dests: int) -> str:
    """The text the loader compiles: the load-time defines, then the entry files of bpf/
    with their includes inlined (see inline_includes)."""
    defines = load_time_defines(pin_root, max_flow_dests)
    lines = ["/* Load-time settings (agent/datapath.py); everything else is bpf/. */"]
    lines += [f"#define {k} {v}" for k, v in defines.items()]
    lines += [f'#include "{name}"' for name in SOURCES]
    return inline_includes("\n".join(lines), bpf_dir()) + "\n"


def prog_pin(pin_root: str, name: str) -> str:
    return f"{pin_root.rstrip('/')}/prog_{name}"


BPF_FS_MAGIC = 0xCAFE4A11


def on_bpffs(path: str) -> bool:
    """Whether ``path`` (or, while it does not exist, its nearest ancestor) is on bpffs."""
    import ctypes

    while not os.path.exists(path) and path not in ("", "/"):
        path = os.path.dirname(path)
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(path.encode(), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value == BPF_FS_MAGIC


def ensure_bpffs(pin_root: str) -> None:
    """Mount bpffs on /sys/fs/bpf if the pin root is not on bpffs already (a container
    given only its own directory of the host's bpffs needs no mount, nor CAP_SYS_ADMIN),
    and create the pin root, root's only (0700)."""
    if pin_root.startswith("/sys/fs/bpf") and not on_bpffs(pin_root) and \
            not os.path.ismount("/sys/fs/bpf"):
        os.makedirs("/sys/fs/bpf", exist_ok=True)
        r = subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"],
                           capture_output=True, text=True)
        if r.returncode:
            raise DatapathError(f"cannot mount bpffs on /sys/fs/bpf: {r.stderr.strip()}")
    if not os.path.isdir(pin_root):
        os.makedirs(pin_root, mode=0o700, exist_ok=True)


def _nla_walk(buf: bytes, start: int, end: int):
    """(type, payload offset, payload end) of the netlink attributes in buf[start:end]."""
    while start + 4 <= end:
        length, kind = struct.unpack_from("HH", buf, start)
        if length < 4:
            return
        yield kind & 0x3FFF, start + 4, min(start + length, end)
        start += (length + 3) & ~3


def _legacy_bpf_prog_id(msg) -> int:
    """The program id of a cls_bpf filter (TCA_OPTIONS / TCA_BPF_ID), read from the raw
    message: pyroute2 0.9 does not decode that attribute. 0 when absent."""
    buf, off = getattr(msg, "data", None), getattr(msg, "offset", 0)
    if not buf:
        return 0
    end = off + msg["header"]["length"]
    for kind, at, stop in _nla_walk(buf, off + 16 + 20, end):  # nlmsghdr, struct tcmsg
        if kind == 2:  # TCA_OPTIONS
            for k, a, e in _nla_walk(buf, at, stop):
                if k == 11 and e - a >= 4:  # TCA_BPF_ID
                    return struct.unpack_from("I", buf, a)[0]
    return 0


@dataclass
class Attachment:
    ifname: str
    ifindex: int
    mode: str = "legacy"  # "tcx" or "legacy"


@dataclass
class ChainEntry:
    """One program in an interface's chain, in the order the kernel runs them."""

    hook: str  # "tcx" or "legacy"
    prog_id: int
    name: str
    ours: bool
    link_id: int = 0  # tcx
    priority: int = 0  # legacy


@dataclass
class HookState:
    """What the kernel holds in one direction of an interface, as far as we are
    concerned: where our program sits, and what runs before it."""

    direction: str  # "ingress" or "egress"
    chain: list[ChainEntry]
    problem: str = ""  # empty: ours is there, current, and first

    @property
    def position(self) -> int:
        """1-based position of our program in the chain (tcx first), 0: absent."""
        for i, e in enumerate(self.chain):
            if e.ours:
                return i + 1
        return 0


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
        self.attach_mode = "auto"  # as asked; self.mode() says what it resolved to
        # Pod-side attachment: the to-pod direction classified on the pod's own device
        # (for CNIs that deliver with bpf_redirect_peer); see _attach_pod_side.
        self.pod_side = False
        self._mode: str | None = None

    def set_attach_mode(self, mode: str) -> None:
        if mode not in ATTACH_MODES:
            raise DatapathError(f"attach mode must be one of {', '.join(ATTACH_MODES)}, "
                                f"not {mode!r}")
        self.attach_mode, self._mode = mode, None

    def mode(self) -> str:
        """How pod interfaces are attached: "tcx" or "legacy" (resolved once)."""
        if self._mode is None:
            asked = self.attach_mode
            if asked == "auto":
                asked = os.environ.get(ATTACH_MODE_ENV, "auto") or "auto"
                if asked not in ATTACH_MODES:
                    raise DatapathError(f"{ATTACH_MODE_ENV}={asked!r}: must be one of "
                                        f"{', '.join(ATTACH_MODES)}")
            with entered(self.netns):
                has_tcx = bpfsys.tcx_supported()
            if asked == "tcx" and not has_tcx:
                raise DatapathError("attach mode tcx asked for, but this kernel has no tcx "
                                    "(Linux >= 6.6 with CONFIG_NET_XGRESS): use auto or "
                                    "legacy")
            self._mode = "tcx" if asked == "tcx" or (asked == "auto" and has_tcx) \
                else "legacy"
        return self._mode

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
                if spec.kind == "prog" or spec.pin != layout.PIN_BY_NAME:
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
        """Attach (or replace in place: a restarted agent's new programs) the classifier
        on both directions of the interface, in the node's attach mode. When it was
        attached the other way, that attachment is removed once the new one is in place
        (a packet may be copied twice then, never not at all)."""
        if self.pod_side:
            return self._attach_pod_side(idx, ifname)
        mode = self.mode()
        done = []
        try:
            for dname, prog, tcx_type, parent in DIRECTIONS:
                if mode == "tcx":
                    created = self._attach_tcx(idx, prog, tcx_type, dname)
                else:
                    created = not self._legacy_present(idx, parent)
                    self._attach_tc(idx, prog, parent)
                done.append((dname, parent, created))
        except Exception as e:
            for dname, parent, created in done:  # leave nothing half attached
                if created:
                    self._detach_one(idx, dname, parent, mode)
            raise DatapathError(f"attaching to {ifname or idx} ({mode}) failed: {e}") from e
        for dname, _, _, parent in DIRECTIONS:
            if mode == "tcx":
                self._detach_tc(idx, parent)
            else:
                self._detach_tcx(idx, dname)
        self._detach_pod_side(idx)
        return Attachment(ifname, idx, mode)

    def detach(self, ifindex: int) -> None:
        for dname, _, _, parent in DIRECTIONS:
            self._detach_tcx(ifindex, dname)
            self._detach_tc(ifindex, parent)
        self._detach_pod_side(ifindex)

    # ---- pod-side attachment (for CNIs that deliver with bpf_redirect_peer)
    def pod_peer(self, idx: int) -> tuple[str, int]:
        """The pod's side of a host-side veth: (the name of its network namespace under
        /var/run/netns, its ifindex there). Raises DatapathError saying what is
        missing."""
        ipr = iproute(self.netns)
        try:
            links = ipr.get_links(idx)
            if not links:
                raise DatapathError(f"ifindex {idx} is gone")
            link = links[0]
            name = link.get_attr("IFLA_IFNAME")
            peer_idx = link.get_attr("IFLA_LINK")
            nsid = link.get_attr("IFLA_LINK_NETNSID")
            if not peer_idx or nsid is None:
                raise DatapathError(f"{name} has no peer in another network namespace (a "
                                    "pod-side attachment needs the pod's veth)")
            try:
                names = sorted(os.listdir(NETNS_DIR))
            except OSError:
                names = []
            for ns in names:
                try:
                    fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    found = ipr.get_netnsid(fd=fd)
                except Exception:
                    found = None
                finally:
                    os.close(fd)
                if found and found.get("nsid") == nsid:
                    return ns, peer_idx
        finally:
            ipr.close()
        raise DatapathError(f"the network namespace of {name}'s peer (nsid {nsid}) is not "
                            f"under {NETNS_DIR}: mount the host's {NETNS_DIR} into the agent")

    def _peer_secret(self) -> int:
        """The secret pod-side copies carry (made once, kept in the pinned map)."""
        m = self.maps["peer_config"]
        cfg = layout.PeerConfig.from_buffer_copy(m.lookup(bytes(4)))
        if not cfg.secret:
            cfg.secret = int.from_bytes(os.urandom(8), "little") or 1
            m.update(bytes(4), bytes(cfg))
        return cfg.secret

    def _attach_pod_side(self, idx: int, ifname: str) -> Attachment:
        if self.mode() != "tcx":
            raise DatapathError("the pod-side attachment needs tcx (Linux >= 6.6)")
        self._peer_secret()
        ns, peer_idx = self.pod_peer(idx)
        created = self._attach_tcx(idx, "classify_from_pod_peer", bpfsys.BPF_TCX_INGRESS,
                                   "in")
        try:
            self._attach_pod_link(idx, ns, peer_idx)
        except Exception as e:
            if created:
                self._detach_tcx(idx, "in")
            raise DatapathError(f"attaching inside {ifname or idx}'s pod (network "
                                f"namespace {ns}) failed: {e}") from e
        # The to-pod direction is seen inside the pod now: not on the host side as well.
        self._detach_tcx(idx, "eg")
        for _, _, _, parent in DIRECTIONS:
            self._detach_tc(idx, parent)
        return Attachment(ifname, idx, "tcx")

    def _attach_pod_link(self, idx: int, ns: str, peer_idx: int) -> None:
        """The pod device's ingress: a stub that puts the host-side ifindex in
        skb->cb[layout.POD_SIDE_CB] and tail-calls classify_to_pod_peer (peer_progs[0]). Inside
        the pod's namespace the program cannot tell which pod it serves (ifindexes repeat
        across namespaces), so each pod gets its own five-instruction stub. A link kept
        from an earlier run stays: the loader repointed peer_progs[0]."""
        if self._open_link(idx, "peer", expect=peer_idx) is not None:
            return
        array = obj_get(f"{self.pin_root}/peer_progs")
        try:
            stub = bpfsys.tail_call_stub(array, layout.POD_SIDE_CB, idx, "cn2m_pod_in")
        finally:
            os.close(array)
        try:
            with entered(ns):
                fd = bpfsys.tcx_attach(stub, peer_idx, bpfsys.BPF_TCX_INGRESS,
                                       bpfsys.BPF_F_BEFORE)
        finally:
            os.close(stub)
        try:
            obj_pin(fd, self.link_pin(idx, "peer"))
        except BaseException:
            bpfsys.link_detach(fd)
            raise
        finally:
            os.close(fd)

    def _detach_pod_side(self, idx: int) -> None:
        self._detach_tcx(idx, "peer")

    def _detach_one(self, idx: int, dname: str, parent: str, mode: str) -> None:
        if mode == "tcx":
            self._detach_tcx(idx, dname)
        else:
            self._detach_tc(idx, parent)

    # ---- tcx
    def link_pin(self, ifindex: int, dname: str) -> str:
        return f"{self.pin_root}/link_tcx_{ifindex}_{dname}"

    def _open_link(self, ifindex: int, dname: str,
                   expect: int | None = None) -> tuple[int, bpfsys.LinkInfo] | None:
        """Our pinned link of this interface and direction, open, with its info; None
        when there is none. A defunct one (its device gone, perhaps its ifindex reused)
        is unpinned and None returned. A pod-side link ("peer") is on the pod's device:
        `expect` is that device's ifindex (None: any live one)."""
        if expect is None and dname != "peer":
            expect = ifindex
        path = self.link_pin(ifindex, dname)
        try:
            fd = obj_get(path)
        except FileNotFoundError:
            return None
        try:
            info = bpfsys.link_info(fd)
        except BaseException:
            os.close(fd)
            raise
        if info.type != bpfsys.BPF_LINK_TYPE_TCX or not info.ifindex or \
                (expect is not None and info.ifindex != expect):
            os.close(fd)
            log.info("removing defunct tcx link %s (its interface is gone)", path)
            os.unlink(path)
            return None
        return fd, info

    def _attach_tcx(self, idx: int, prog: str, tcx_type: int, dname: str) -> bool:
        """Our link at the head of the chain running `prog`: the pinned link updated in
        place, or a new one created and pinned. Returns whether it was created."""
        new_fd = self.prog_fd(prog)
        opened = self._open_link(idx, dname)
        if opened is not None:
            fd, info = opened
            try:
                if info.prog_id != bpfsys.prog_id(new_fd):
                    bpfsys.link_update(fd, new_fd)
            finally:
                os.close(fd)
            return False
        with entered(self.netns):  # the ifindex is the namespace's
            fd = bpfsys.tcx_attach(new_fd, idx, tcx_type, bpfsys.BPF_F_BEFORE)
        try:
            obj_pin(fd, self.link_pin(idx, dname))
        except BaseException:
            bpfsys.link_detach(fd)
            raise
        finally:
            os.close(fd)
        return True

    def _detach_tcx(self, idx: int, dname: str) -> None:
        path = self.link_pin(idx, dname)
        try:
            fd = obj_get(path)
        except FileNotFoundError:
            return
        try:
            bpfsys.link_detach(fd)  # now, even if someone else holds the link too
        except BpfError as e:
            if e.errno not in (errno.ENOLINK, errno.EINVAL):
                raise
        finally:
            os.close(fd)
            os.unlink(path)

    def tcx_links(self) -> dict[tuple[int, str], int]:
        """Our pinned links: (ifindex, direction) -> link id (defunct ones removed)."""
        found = {}
        if not os.path.isdir(self.pin_root):
            return found
        for name in sorted(os.listdir(self.pin_root)):
            if not name.startswith("link_tcx_"):
                continue
            try:
                idx_text, dname = name[len("link_tcx_"):].rsplit("_", 1)
                idx = int(idx_text)
            except ValueError:
                continue
            opened = self._open_link(idx, dname)
            if opened is not None:
                os.close(opened[0])
                found[(idx, dname)] = opened[1].id
        return found

    def move_to_head(self, idx: int, direction: str) -> None:
        """Put our link back at the head of the chain (something was attached before
        it). tcx takes a program only once per chain, so the new link cannot be made
        before the old one goes: the old one is detached and a new one made at once
        (packets in those microseconds pass uncopied)."""
        if direction == "pod ingress":
            self._detach_tcx(idx, "peer")
            self.attach_index(idx)
            return
        dname, prog, tcx_type, _ = next(d for d in DIRECTIONS if d[0] == direction[:2])
        if self.pod_side and dname == "in":
            prog = "classify_from_pod_peer"
        self._detach_tcx(idx, dname)
        try:
            self._attach_tcx(idx, prog, tcx_type, dname)
        except BpfError as e:
            raise DatapathError(f"attaching to ifindex {idx} again at the head of the "
                                f"{direction} chain failed: {e}") from e

    def link_indexes(self) -> set[int]:
        ipr = iproute(self.netns)
        try:
            return {link["index"] for link in ipr.get_links()}
        finally:
            ipr.close()

    def mirror_port_problems(self) -> list[str]:
        """What is wrong with the mirror port: a device gone or renumbered, a program
        missing or not the current one. Empty when it is whole."""
        problems = []
        ipr = iproute(self.netns)
        try:
            idx = {}
            for name in (MIRROR_TX, MIRROR_RX):
                found = ipr.link_lookup(ifname=name)
                if not found:
                    problems.append(f"{name} is gone")
                idx[name] = found[0] if found else 0
            if problems:
                return problems
            if (idx[MIRROR_TX], idx[MIRROR_RX]) != (self.mirror_tx_index, self.mirror_rx_index):
                problems.append("the devices were recreated")
            for dev, prog, parent in ((MIRROR_RX, "mirror_wrap", TC_INGRESS),
                                      (MIRROR_TX, "mirror_wrap_inline", TC_EGRESS)):
                want = bpfsys.prog_id(self.prog_fd(prog))
                have = [_legacy_bpf_prog_id(f) for f in
                        self._legacy_filters(ipr, idx[dev], parent) if self._is_ours(f)]
                if want not in have:
                    problems.append(f"{prog} is not attached to {dev}")
            link = ipr.get_links(idx[MIRROR_TX])[0]
            xdp = link.get_attr("IFLA_XDP")
            xdp_id = xdp.get_attr("IFLA_XDP_PROG_ID") if xdp is not None else None
            if xdp_id != bpfsys.prog_id(self.prog_fd("analyzer_port_rx")):
                problems.append(f"analyzer_port_rx (XDP) is not attached to {MIRROR_TX}")
        finally:
            ipr.close()
        return problems

    # ---- legacy
    def _legacy_filters(self, ipr, idx: int, parent: str) -> list:
        try:
            return list(ipr.get_filters(index=idx, parent=parent))
        except Exception:
            return []

    @staticmethod
    def _is_ours(f) -> bool:
        # tcm_info holds the priority in its upper 16 bits
        return f.get_attr("TCA_KIND") == "bpf" and f["info"] >> 16 == TC_PRIO and \
            f["handle"] == TC_HANDLE

    def _legacy_present(self, idx: int, parent: str) -> bool:
        ipr = iproute(self.netns)
        try:
            return any(self._is_ours(f) for f in self._legacy_filters(ipr, idx, parent))
        finally:
            ipr.close()

    def attached_ifindexes(self) -> set[int]:
        """Interfaces that carry our classifier: our pinned tcx links, or our legacy
        filter (found by its handle)."""
        found = {idx for idx, _ in self.tcx_links()}
        ipr = iproute(self.netns)
        try:
            for link in ipr.get_links():
                idx = link["index"]
                if link.get_attr("IFLA_IFNAME") in (MIRROR_TX, MIRROR_RX):
                    continue  # the mirror port's own programs carry our handle too
                if any(self._is_ours(f) for f in self._legacy_filters(ipr, idx, TC_INGRESS)):
                    found.add(idx)
        finally:
            ipr.close()
        return found

    # ---- what the kernel holds
    def _hooks(self, idx: int, pod_side: bool) -> list[tuple]:
        """The hooks our programs should hold on a pod interface: (link name, program,
        tcx attach type, legacy parent or None, label, network namespace, ifindex)."""
        if not pod_side:
            return [(d, prog, t, parent, "ingress" if d == "in" else "egress", self.netns, idx)
                    for d, prog, t, parent in DIRECTIONS]
        hooks = [("in", "classify_from_pod_peer", bpfsys.BPF_TCX_INGRESS, TC_INGRESS,
                  "ingress", self.netns, idx)]
        try:
            ns, peer_idx = self.pod_peer(idx)
        except DatapathError:
            ns, peer_idx = None, 0
        hooks.append(("peer", None, bpfsys.BPF_TCX_INGRESS, None, "pod ingress", ns,
                      peer_idx))  # a stub per pod: no shared program to compare with
        return hooks

    def hook_states(self, idx: int, mode: str | None = None,
                    pod_side: bool | None = None) -> list[HookState]:
        """Both directions of a pod interface as the kernel holds them: every program in
        the order they run (tcx chain, then the legacy filters by priority), which one
        is ours, and what is wrong with our place (missing, stale program, not first),
        judged for attach mode `mode` (default: the node's). With the pod-side
        attachment, the to-pod direction is the pod device's ingress ("pod ingress")."""
        mode = mode or self.mode()
        pod_side = self.pod_side if pod_side is None else pod_side
        states = []
        ipr = iproute(self.netns)
        try:
            for dname, prog, tcx_type, parent, label, ns, target in self._hooks(idx, pod_side):
                if not target:
                    states.append(HookState(label, [], "the pod's side of the veth cannot "
                                                        "be found"))
                    continue
                want = bpfsys.prog_id(self.prog_fd(prog)) if prog in self.progs else 0
                opened = self._open_link(idx, dname, expect=target)
                ours_link = 0
                if opened is not None:
                    os.close(opened[0])
                    ours_link = opened[1].id
                chain: list[ChainEntry] = []
                with entered(ns):  # tcx runs first, whatever our mode
                    try:
                        progs, links, _ = bpfsys.tcx_query(target, tcx_type)
                    except BpfError:  # no tcx in this kernel
                        progs, links = [], []
                for pid, lid in zip(progs, links, strict=False):
                    chain.append(ChainEntry("tcx", pid, bpfsys.prog_name(pid),
                                            lid == ours_link, link_id=lid))
                for f in self._legacy_filters(ipr, idx, parent) if parent else ():
                    if f.get_attr("TCA_KIND") is None or not f["handle"]:
                        continue  # the per-priority chain heads of the dump
                    pid = _legacy_bpf_prog_id(f)
                    opts = f.get_attr("TCA_OPTIONS")
                    name = (opts.get_attr("TCA_BPF_NAME") or "") if pid else \
                        str(f.get_attr("TCA_KIND"))
                    chain.append(ChainEntry("legacy", pid, name, self._is_ours(f),
                                            priority=f["info"] >> 16))
                if mode == "legacy":  # a leftover tcx link is not ours to count on
                    for e in chain:
                        e.ours = e.ours and e.hook == "legacy"
                st = HookState(label, chain)
                mine = [e for e in chain if e.ours]
                if not mine:
                    st.problem = f"no {mode} attachment"
                elif want and mine[0].prog_id and mine[0].prog_id != want:
                    st.problem = (f"runs program id {mine[0].prog_id}, not the current "
                                  f"{want}")
                elif st.position != 1:
                    before = ", ".join(f"{e.name or e.prog_id} ({e.hook})"
                                       for e in chain[:st.position - 1])
                    st.problem = f"not first in the chain: after {before}"
                states.append(st)
        finally:
            ipr.close()
        return states

    def open_pinned_programs(self) -> None:
        """Open the pinned programs without loading anything (for reading what is
        attached, e.g. from the CLI): those missing are left out."""
        for name in PROGRAMS:
            if name not in self.progs:
                try:
                    self.progs[name] = obj_get(prog_pin(self.pin_root, name))
                except (FileNotFoundError, BpfError):
                    pass

    def attachment_of(self, idx: int) -> dict:
        """How an interface is attached, for people (show interfaces, doctor):
        {"attach": "tcx" | "legacy" | None, "ingress"/"egress": {"position", "of",
        "ahead", "problem"}}; position 1 is first, 0 absent."""
        has_link = any(os.path.exists(self.link_pin(idx, d)) for d, _, _, _ in DIRECTIONS)
        pod_side = os.path.exists(self.link_pin(idx, "peer"))
        has_filter = any(self._legacy_present(idx, parent) for _, _, _, parent in DIRECTIONS)
        mode = "tcx" if has_link or pod_side else "legacy" if has_filter else None
        out: dict = {"attach": ("tcx+pod" if pod_side else mode)}
        for st in self.hook_states(idx, mode or "legacy", pod_side=pod_side):
            pos = st.position
            out[st.direction] = {
                "position": pos, "of": len(st.chain),
                "ahead": [f"{e.name or e.prog_id} ({e.hook})" for e in st.chain[:max(pos - 1, 0)]],
                "problem": st.problem if mode else "not attached"}
        return out

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
