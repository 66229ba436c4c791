"""``cn2mirror doctor``: is this machine able to run the datapath, and if not, why.

Checks privileges (root, capabilities), the kernel (version, config options, BTF),
bpffs and the pin root, kernel headers for bcc, the Python side (bcc, pyroute2, libbpf)
and the tools the agent runs; then a live probe: compile and load a tiny SCHED_CLS and
XDP program with bcc, test-run both (BPF_PROG_TEST_RUN), pin a map under the pin root,
and attach the programs to a veth pair (clsact + bpf filter, XDP) in a temporary network
namespace, which is removed again.

Every check is ok, warn (optional or degraded) or missing (required), with a fix.
Exit 0 when every required check passes, 1 otherwise. The agent need not be running.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import click

from cn2mirror.agent import capabilities
from cn2mirror.agent.defaults import DEFAULT_PIN_ROOT

from .output import JSON_VERSION, emit, output_option, render_table

OK, WARN, MISSING = "ok", "warn", "missing"


# (option, required, what it is for)
KERNEL_OPTIONS = (
    ("BPF_SYSCALL", True, "the bpf() system call"),
    ("NET_CLS_BPF", True, "tc bpf filters (the classifier and the wrapper)"),
    ("NET_SCH_INGRESS", True, "the clsact qdisc the filters hang off"),
    ("NET_CLS_ACT", True, "tc actions: direct-action filters, clone-redirect"),
    ("VETH", True, "veth pairs: the mirror port"),
    ("BPF_JIT", False, "JIT-compiled BPF (the interpreter is slow)"),
    ("DEBUG_INFO_BTF", False, "kernel BTF (/sys/kernel/btf/vmlinux)"),
    ("BPF_EVENTS", False, "BPF on tracepoints/kprobes (bcc's tooling)"),
    ("VXLAN", False, "MirrorDestinations with nextHopMode: static (VXLAN)"),
)

TOOLS = (
    # (tool, required, Debian package, what for)
    ("ip", True, "iproute2", "network namespaces, links"),
    ("tc", True, "iproute2", "inspecting qdiscs and filters"),
    ("ethtool", True, "ethtool", "offloads of the mirror port"),
    ("nsenter", True, "util-linux", "running ethtool inside a node's network namespace"),
    ("tshark", False, "tshark", "decoding jmirror copies at an analyzer"),
    ("iperf3", False, "iperf3", "traffic for the demo and benchmarks"),
)

PROBE_PACKET_LEN = 60
PROBE_SOURCE = f"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
BPF_ARRAY(doctor_probe, u32, 1);
int probe_tc(struct __sk_buff *skb)
{{
    u32 zero = 0;
    u32 *v = doctor_probe.lookup(&zero);
    if (v)
        (*v)++;
    return skb->len == {PROBE_PACKET_LEN} ? TC_ACT_OK : TC_ACT_SHOT;
}}
int probe_xdp(struct xdp_md *ctx)
{{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    return data_end - data == {PROBE_PACKET_LEN} ? XDP_PASS : XDP_DROP;
}}
"""
TC_ACT_OK, XDP_PASS = 0, 2
XDP_FLAGS_SKB_MODE = 2
SETUP = "scripts/setup.sh"


@dataclass
class Check:
    name: str
    group: str
    status: str
    required: bool
    detail: str
    fix: str | None = None


class Doctor:
    def __init__(self, pin_root: str, netns: str | None = None):
        self.pin_root = pin_root.rstrip("/") or "/"
        self.netns = netns
        self.checks: list[Check] = []
        self.release = os.uname().release

    def add(self, name: str, group: str, ok: bool, required: bool, detail: str,
            fix: str | None = None, *, warn: bool = False) -> Check:
        status = OK if ok else (WARN if warn or not required else MISSING)
        c = Check(name, group, status, required, detail, None if ok else fix)
        self.checks.append(c)
        return c

    # ------------------------------------------------------------------ privileges
    def privileges(self) -> None:
        euid = os.geteuid()
        self.add("root", "privileges", euid == 0, True, f"effective uid {euid}",
                 "run as root: sudo cn2mirror ...")
        caps = capabilities.effective()
        for name in capabilities.CAPABILITIES:
            have = capabilities.has(name, caps)
            # The datapath needs BPF, PERFMON and NET_ADMIN only (tests/
            # test_least_privilege.py); SYS_ADMIN serves labs (--netns: setns) and
            # mounting bpffs, which the DaemonSet's init container does.
            required = name != "CAP_SYS_ADMIN"
            self.add(name, "privileges", have, required,
                     "in CapEff" if have else ("not in CapEff" if caps is not None
                                              else "cannot read /proc/self/status"),
                     "run as root in the host's user namespace; in a container add "
                     "capabilities BPF, NET_ADMIN and PERFMON" if required else
                     "needed only for --netns (lab nodes) and to mount bpffs: run as "
                     "root in the host's user namespace")

    # ------------------------------------------------------------------ kernel
    def kernel(self) -> None:
        version = _version_tuple(self.release)
        self.add("kernel version", "kernel", version >= (5, 10), True,
                 f"Linux {self.release}",
                 "use Linux 5.10 or later (CAP_BPF, BPF_PROG_TEST_RUN for tc and XDP, "
                 "bounded loops)", warn=version >= (5, 8))
        config, source = _kernel_config(self.release)
        if config is None:
            self.add("kernel config", "kernel", False, False,
                     "neither /proc/config.gz nor /boot/config-" + self.release + " is "
                     "readable: the options below are not checked",
                     "modprobe configs (CONFIG_IKCONFIG_PROC), or install the kernel's "
                     "config as /boot/config-$(uname -r)", warn=True)
        else:
            for option, required, what in KERNEL_OPTIONS:
                value = config.get(f"CONFIG_{option}")
                ok = value == "y"
                detail = f"CONFIG_{option}={value or 'not set'} ({what}; from {source})"
                if value == "m":
                    self.add(f"CONFIG_{option}", "kernel", False, required,
                             detail, "built as a module: modprobe it (or build it in)",
                             warn=True)
                    continue
                self.add(f"CONFIG_{option}", "kernel", ok, required, detail,
                         f"a kernel built with CONFIG_{option}=y")
        btf = "/sys/kernel/btf/vmlinux"
        self.add(btf, "kernel", os.path.exists(btf), False,
                 "present" if os.path.exists(btf) else "absent (bcc works without it)",
                 "a kernel with CONFIG_DEBUG_INFO_BTF=y")

    # ------------------------------------------------------------------ bpffs
    def bpffs(self) -> None:
        mounts = _mounts()
        on_sys = mounts.get("/sys/fs/bpf") == "bpf"
        self.add("bpffs on /sys/fs/bpf", "bpffs", on_sys, False,
                 "mounted" if on_sys else "not mounted (the agent mounts it when its pin "
                 "root is under /sys/fs/bpf)",
                 "mount -t bpf bpf /sys/fs/bpf (scripts/setup.sh does it)", warn=True)
        root = self.pin_root
        existing = root
        while not os.path.exists(existing):
            existing = os.path.dirname(existing) or "/"
        fstype = _fs_type(existing, mounts)
        pins = os.path.exists(os.path.join(root, "flows"))
        if fstype == "bpf":
            writable = os.access(existing, os.W_OK)
            state = ("exists, holds a cn2mirror pin set" if pins else "exists") \
                if existing == root else f"will be created in {existing}"
            self.add("pin root", "bpffs", writable, True,
                     f"{root}: {state} (bpffs{'' if writable else ', not writable'})",
                     f"make {existing} writable for this user, or run as root")
        elif root.startswith("/sys/fs/bpf/") and not on_sys and existing in (
                "/sys/fs/bpf", "/sys/fs", "/sys"):
            self.add("pin root", "bpffs", False, True,
                     f"{root}: /sys/fs/bpf is not a bpffs yet; the agent mounts it at start",
                     "mount -t bpf bpf /sys/fs/bpf", warn=True)
        else:
            self.add("pin root", "bpffs", False, True,
                     f"{root} is not on a bpffs ({existing} is on {fstype or 'unknown'}): "
                     "maps cannot be pinned there",
                     f"use a pin root under /sys/fs/bpf (default {DEFAULT_PIN_ROOT}), or "
                     f"mount a bpffs there first: mkdir -p {root} && mount -t bpf bpf {root}")

    # ------------------------------------------------------------------ headers
    def headers(self) -> None:
        build = f"/lib/modules/{self.release}/build"
        source = f"/lib/modules/{self.release}/source"
        fix = (f"run {SETUP}: it installs linux-headers-{self.release}, or, for a kernel "
               "Debian does not package, links Debian's linux-headers-amd64: "
               f"ln -sfn /usr/src/linux-headers-<ver>-amd64 {build}; "
               f"ln -sfn /usr/src/linux-headers-<ver>-common {source}")
        if not os.path.isdir(os.path.join(build, "include")):
            self.add("kernel headers", "headers", False, True,
                     f"{build} is missing (bcc compiles against it)", fix)
            return
        target = os.path.realpath(build)
        has_linux = any(os.path.isdir(os.path.join(d, "include", "linux"))
                        for d in (build, source))
        self.add("kernel headers", "headers", has_linux, True,
                 f"{build} -> {target}" + ("" if has_linux else
                                            f"; {source} (include/linux) is missing"), fix)

    # ------------------------------------------------------------------ python side
    def python(self) -> None:
        try:
            import bcc
            version = getattr(bcc, "__version__", None) or "unknown version"
            self.add("bcc (python3-bpfcc)", "software", True, True,
                     f"bcc {version} from {os.path.dirname(bcc.__file__)}")
        except Exception as e:
            self.add("bcc (python3-bpfcc)", "software", False, True, f"cannot import bcc: {e}",
                     "apt-get install python3-bpfcc, and run from a venv made from "
                     "/usr/bin/python3 with --system-site-packages (make setup does both)")
        try:
            import importlib.metadata

            import pyroute2  # noqa: F401
            self.add("pyroute2", "software", True, True,
                     f"pyroute2 {importlib.metadata.version('pyroute2')}")
        except Exception as e:
            self.add("pyroute2", "software", False, True, f"cannot import pyroute2: {e}",
                     "pip install pyroute2 (make setup installs cn2mirror's dependencies)")
        try:
            from cn2mirror.agent.bpfsys import lib

            libbpf = lib()
            has_test_run = hasattr(libbpf, "bpf_prog_test_run_opts")
            self.add("libbpf.so.1", "software", has_test_run, True,
                     f"{libbpf._name}" + ("" if has_test_run else
                                          " lacks bpf_prog_test_run_opts (libbpf < 0.7)"),
                     "apt-get install libbpf1")
        except Exception as e:
            self.add("libbpf.so.1", "software", False, True, str(e), "apt-get install libbpf1")

    # ------------------------------------------------------------------ tools
    def tools(self) -> None:
        for tool, required, package, what in TOOLS:
            path = shutil.which(tool)
            self.add(tool, "tools", path is not None, required,
                     f"{path} ({what})" if path else f"not found in PATH ({what})",
                     f"apt-get install {package}")

    # ------------------------------------------------------------------ live probe
    def probe(self) -> None:
        try:
            from bcc import BPF
        except Exception as e:
            self.add("probe: compile", "probe", False, True, f"bcc is not importable: {e}",
                     "see the bcc check above")
            return
        try:
            with _quiet_stderr():
                b = BPF(text=PROBE_SOURCE, cflags=["-w", "-Wno-error"])
        except Exception as e:
            self.add("probe: compile", "probe", False, True,
                     f"bcc could not compile a tiny program: {_first_line(e)}",
                     f"check the kernel headers (run {SETUP})")
            return
        try:
            self.add("probe: compile", "probe", True, True, "bcc compiled the probe programs")
            self._probe_programs(b, BPF)
        finally:
            b.cleanup()

    def _probe_programs(self, b, BPF) -> None:
        from cn2mirror.agent.bpfsys import test_run

        fns = {}
        for name, kind, label in (("probe_tc", BPF.SCHED_CLS, "SCHED_CLS"),
                                  ("probe_xdp", BPF.XDP, "XDP")):
            try:
                fns[name] = b.load_func(name, kind)
            except Exception as e:
                self.add(f"probe: load {label}", "probe", False, True,
                         f"the kernel rejected a {label} program: {_first_line(e)}",
                         "check CONFIG_BPF_SYSCALL and the capabilities above")
                continue
            packet = b"\xff" * 12 + b"\x08\x00" + bytes(PROBE_PACKET_LEN - 14)
            want = TC_ACT_OK if name == "probe_tc" else XDP_PASS
            try:
                retval, _, _ = test_run(fns[name].fd, packet)
                self.add(f"probe: load and test-run {label}", "probe", retval == want, True,
                         f"BPF_PROG_TEST_RUN returned {retval} (expected {want})",
                         "the kernel runs BPF programs incorrectly: try another kernel")
            except Exception as e:
                self.add(f"probe: load and test-run {label}", "probe", False, True,
                         f"BPF_PROG_TEST_RUN failed: {e}",
                         "a kernel with BPF_PROG_TEST_RUN for this program type (5.10+)")
        self._probe_pin(b)
        if "probe_tc" in fns:
            self._probe_veth(fns["probe_tc"], fns.get("probe_xdp"), BPF)

    def _probe_pin(self, b) -> None:
        from cn2mirror.agent.bpfsys import obj_pin

        directory = self.pin_root
        while not os.path.exists(directory):
            directory = os.path.dirname(directory) or "/"
        if _fs_type(directory, _mounts()) != "bpf":
            return  # the pin root check says why
        # bpffs refuses names with dots in them
        path = os.path.join(directory, f"cn2m-doctor-{os.getpid()}")
        try:
            obj_pin(b.get_table("doctor_probe").get_fd(), path)
            self.add("probe: pin a map", "probe", True, True, f"pinned and unpinned {path}")
        except Exception as e:
            self.add("probe: pin a map", "probe", False, True, f"pinning at {path}: {e}",
                     f"make {directory} a writable bpffs (see the pin root check)")
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _probe_veth(self, tc_fn, xdp_fn, BPF) -> None:
        from cn2mirror.agent.netns import entered, iproute

        ip = shutil.which("ip")
        if ip is None:
            self.add("probe: veth + clsact + bpf filter", "probe", False, True,
                     "needs the ip tool to make a temporary network namespace",
                     "apt-get install iproute2")
            return
        ns = f"cn2m-doctor-{uuid.uuid4().hex[:8]}"
        step = "creating network namespace"
        try:
            r = subprocess.run([ip, "netns", "add", ns], capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stderr.strip() or r.stdout.strip())
            ipr = iproute(ns)
            try:
                step = "creating a veth pair"
                ipr.link("add", ifname="cn2m-dr0", kind="veth", peer="cn2m-dr1")
                idx = ipr.link_lookup(ifname="cn2m-dr0")[0]
                ipr.link("set", index=idx, state="up")
                step = "adding the clsact qdisc"
                ipr.tc("add", "clsact", idx)
                step = "attaching a bpf filter (direct action)"
                ipr.tc("add-filter", "bpf", idx, 0xC2, fd=tc_fn.fd, name="probe_tc",
                       parent="ffff:fff2", classid=1, direct_action=True, prio=1,
                       protocol=0x0003)
                step = "listing the filter"
                if not ipr.get_filters(index=idx, parent="ffff:fff2"):
                    raise RuntimeError("the filter is not listed after attaching")
            finally:
                ipr.close()
            self.add("probe: veth + clsact + bpf filter", "probe", True, True,
                     f"attached in temporary network namespace {ns}")
            self._probe_tcx(ns, tc_fn)
        except Exception as e:
            self.add("probe: veth + clsact + bpf filter", "probe", False, True,
                     f"{step} failed: {_first_line(e)}",
                     "needs CONFIG_VETH, CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_BPF, "
                     "CONFIG_NET_CLS_ACT and CAP_NET_ADMIN (see above)")
            xdp_fn = None
        if xdp_fn is not None:
            try:
                with entered(ns):
                    BPF.attach_xdp("cn2m-dr1", xdp_fn, XDP_FLAGS_SKB_MODE)
                    BPF.remove_xdp("cn2m-dr1", XDP_FLAGS_SKB_MODE)
                self.add("probe: XDP attach (generic)", "probe", True, True,
                         "attached to and removed from the veth's peer")
            except Exception as e:
                self.add("probe: XDP attach (generic)", "probe", False, True,
                         f"attaching XDP failed: {_first_line(e)}",
                         "needs generic XDP on veth (Linux 4.12+) and CAP_NET_ADMIN")
        subprocess.run([ip, "netns", "del", ns], capture_output=True)

    # ------------------------------------------------------------------ attachment
    def attachment(self) -> None:
        """How the agent attaches (tcx or legacy clsact) and, when it runs, where its
        programs sit in every pod interface's chain."""
        from cn2mirror.agent import bpfsys
        from cn2mirror.agent.datapath import ATTACH_MODE_ENV, Datapath

        try:
            has_tcx = bpfsys.tcx_supported()
        except Exception:
            has_tcx = False
        forced = os.environ.get(ATTACH_MODE_ENV, "")
        if has_tcx:
            self.add("tcx", "attachment", True, False,
                     "tcx links: the classifier runs first on every pod interface, ahead "
                     "of a CNI's tcx programs (Cilium >= 1.16)"
                     + (f"; {ATTACH_MODE_ENV}={forced} asks for {forced}" if forced else ""))
        else:
            self.add("tcx", "attachment", False, False,
                     "no tcx (Linux < 6.6): legacy clsact filters, which run only after "
                     "any tcx program passes the packet on",
                     "Linux >= 6.6 with CONFIG_NET_XGRESS for tcx")
        if not os.path.isdir(self.pin_root):
            return
        dp = Datapath(self.pin_root, self.netns)
        try:
            dp.open_pinned_programs()
            if not dp.progs:
                return
            found = {}
            for idx in sorted(dp.attached_ifindexes()):
                found[idx] = dp.attachment_of(idx)
        except Exception as e:
            self.add("attachments in use", "attachment", False, False,
                     f"cannot read them: {_first_line(e)}", "run as root; give --netns")
            return
        finally:
            dp.close()
        if not found:
            self.add("attachments in use", "attachment", True, False,
                     f"no pod interface carries the classifier (pins under {self.pin_root})")
            return
        modes = sorted({a["attach"] or "none" for a in found.values()})
        bad = [f"ifindex {idx} {d}: {a[d]['problem']}" for idx, a in found.items()
               for d in ("ingress", "egress", "pod ingress")
               if (a.get(d) or {}).get("problem")]
        detail = (f"{'/'.join(modes)} on {len(found)} interface(s)"
                  + ("; first in every chain" if not bad else "; " + "; ".join(bad[:5])))
        self.add("attachments in use", "attachment", not bad, False, detail,
                 "the agent's resync repairs missing or displaced attachments; a legacy "
                 "filter behind tcx programs needs tcx (see `tcx`)")

    def _probe_tcx(self, ns: str, tc_fn) -> None:
        from cn2mirror.agent import bpfsys
        from cn2mirror.agent.netns import entered

        if not bpfsys.tcx_supported():
            return
        try:
            with entered(ns):
                idx = socket.if_nametoindex("cn2m-dr0")
                fd = bpfsys.tcx_attach(tc_fn.fd, idx, bpfsys.BPF_TCX_INGRESS,
                                       bpfsys.BPF_F_BEFORE)
                try:
                    progs, _, _ = bpfsys.tcx_query(idx, bpfsys.BPF_TCX_INGRESS)
                finally:
                    bpfsys.link_detach(fd)
                    os.close(fd)
            ok = progs[:1] == [bpfsys.prog_id(tc_fn.fd)]
            self.add("probe: tcx link at the head", "probe", ok, False,
                     "attached first in the chain, queried and detached" if ok else
                     f"the chain reads {progs}")
        except Exception as e:
            self.add("probe: tcx link at the head", "probe", False, False,
                     f"tcx attach failed: {_first_line(e)}",
                     "the agent falls back to legacy clsact (or set "
                     "CN2MIRROR_ATTACH_MODE=legacy)")

    # ------------------------------------------------------------------ sampling
    def sampling(self) -> None:
        """Flow sampling under the public default seed: anyone can tell which flows are
        sampled, and a pod's owner can pick ports that never are (docs/copy-limits.md)."""
        from cn2mirror.agent import layout as L
        from cn2mirror.agent.pinned import NotPinned, PinnedMaps

        try:
            pm = PinnedMaps(self.pin_root)
        except (NotPinned, OSError):
            return  # nothing pinned: nothing samples
        try:
            seed = L.Config.from_buffer_copy(pm.map("config").lookup(bytes(4))).sample_seed
            by_flow = [f"destination slot {int.from_bytes(k, 'little')}"
                       for k, v in pm.map("copy_limits").items()
                       if (e := L.CopyLimits.from_buffer_copy(v)).sample_every > 1
                       and e.sample_by == L.SAMPLE_BY_FLOW]
            by_flow += [f"rule slot {slot}" for slot, e in pm.rule_sampling().items()
                        if e.sample_every > 1 and e.sample_by == L.SAMPLE_BY_FLOW]
        except (NotPinned, OSError) as e:
            self.add("flow sampling seed", "sampling", False, False,
                     f"cannot read the maps: {_first_line(e)}", "run as root")
            return
        finally:
            pm.close()
        if not by_flow:
            self.add("flow sampling seed", "sampling", True, False,
                     "no destination or rule samples by flow")
        elif seed:
            self.add("flow sampling seed", "sampling", True, False,
                     f"{len(by_flow)} sample(s) by flow, under this node's own seed")
        else:
            self.add("flow sampling seed", "sampling", False, False,
                     f"{', '.join(by_flow[:5])} sample(s) by flow under the public default "
                     "seed: a pod's owner can choose ports that are never sampled",
                     "give every node the same secret seed: the Secret "
                     "cn2mirror-flow-sampling (key seed), or cn2mirror agent "
                     "--flow-sampling-seed N", warn=True)

    # ------------------------------------------------------------------ all
    def run(self, probe: bool = True) -> dict:
        self.privileges()
        self.kernel()
        self.bpffs()
        self.attachment()
        self.sampling()
        self.headers()
        self.python()
        self.tools()
        if probe:
            self.probe()
        summary = {s: sum(c.status == s for c in self.checks) for s in (OK, WARN, MISSING)}
        return {"version": JSON_VERSION, "ok": summary[MISSING] == 0,
                "kernel": self.release, "pin_root": self.pin_root, "probe": probe,
                "summary": summary, "checks": [asdict(c) for c in self.checks]}


# ============================================================================ helpers
def _version_tuple(release: str) -> tuple[int, int]:
    parts = []
    for p in release.split("-")[0].split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple((parts + [0, 0])[:2])


def _kernel_config(release: str) -> tuple[dict[str, str] | None, str | None]:
    for path, opener in (("/proc/config.gz", gzip.open), (f"/boot/config-{release}", open)):
        try:
            with opener(path, "rt") as fh:
                text = fh.read()
        except OSError:
            continue
        config = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                k, _, v = line.partition("=")
                config[k] = v.strip().strip('"')
        return config, path
    return None, None


def _mounts() -> dict[str, str]:
    """Mount point -> filesystem type (the last mount on a point wins)."""
    out = {}
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 3:
                    point = fields[1].replace("\\040", " ").replace("\\011", "\t")
                    out[point] = fields[2]
    except OSError:
        pass
    return out


def _fs_type(path: str, mounts: dict[str, str]) -> str | None:
    """Filesystem type of the mount `path` (an existing path) is on."""
    path = os.path.realpath(path)
    best = None
    for point in mounts:
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) > len(best):
                best = point
    return mounts.get(best) if best else None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """bcc's compiler writes warnings straight to fd 2; keep them off the report."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ============================================================================ command
def _table(data: dict) -> str:
    out = [f"cn2mirror doctor: Linux {data['kernel']}, pin root {data['pin_root']}"]
    rows = []
    for c in data["checks"]:
        label = c["status"].upper() if c["status"] != OK else "ok"
        name = c["name"] + ("" if c["required"] else " (optional)")
        rows.append([label, c["group"], name, c["detail"]])
    out.append(render_table(["STATUS", "GROUP", "CHECK", "DETAIL"], rows))
    problems = [c for c in data["checks"] if c["status"] != OK]
    if problems:
        out.append("")
        out.append("How to fix:")
        for c in problems:
            out.append(f"  [{c['status']}] {c['name']}: {c['fix'] or 'see the detail above'}")
    s = data["summary"]
    out.append("")
    if data["ok"]:
        out.append(f"All required checks pass ({s[OK]} ok, {s[WARN]} warnings).")
    else:
        out.append(f"{s[MISSING]} required check(s) fail ({s[OK]} ok, {s[WARN]} warnings): "
                   "the datapath cannot run here until they are fixed.")
    if not data["probe"]:
        out.append("The live probe was skipped (--no-probe).")
    return "\n".join(out)


DOCTOR_EPILOG = """\b
Examples:
  cn2mirror doctor
  cn2mirror doctor -o json | jq '.checks[] | select(.status != "ok")'
  cn2mirror doctor --no-probe --pin-root /sys/fs/bpf/cn2mirror

Exit status: 0 when every required check passes (warnings allowed), 1 otherwise.
The agent need not be running. Most fixes: run scripts/setup.sh (make setup) as root.
"""


@click.command(epilog=DOCTOR_EPILOG)
@click.option("--pin-root", metavar="DIR", default=DEFAULT_PIN_ROOT, show_default=True,
              envvar="CN2MIRROR_PIN_ROOT", type=click.Path(file_okay=False),
              help="The pin root the agent will use (checked for bpffs and writable).")
@click.option("--no-probe", is_flag=True,
              help="Skip the live probe (compiling, loading, test-running and attaching "
                   "tiny programs).")
@click.option("--netns", metavar="NAME",
              help="The agent's network namespace (its --netns), where its attachments "
                   "are read.")
@output_option
def doctor(pin_root, no_probe, netns, fmt):
    """Check kernel, tools and privileges the datapath needs; say how to fix what is
    missing; say how the classifier is attached and where it sits in each chain."""
    data = Doctor(pin_root, netns).run(probe=not no_probe)
    emit(data, fmt, _table)
    if not data["ok"]:
        click.get_current_context().exit(1)


def run_checks(pin_root: str = DEFAULT_PIN_ROOT, probe: bool = True,
               netns: str | None = None) -> dict:
    """The doctor's report as a dict (for other commands and tests)."""
    return Doctor(pin_root, netns).run(probe=probe)
