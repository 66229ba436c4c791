"""`cn2mirror doctor` on this machine: everything the datapath needs is here, so it
passes; pointed at things that are missing (a pin root off bpffs, tools not in PATH) it
says which, how to fix them, and exits 1 when a required one is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest
from click.testing import CliRunner

from cn2mirror.cli.main import main

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="doctor's probe needs root")

REQUIRED_NAMES = {
    "root", "CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON",
    "CONFIG_BPF_SYSCALL", "CONFIG_NET_CLS_BPF", "CONFIG_NET_SCH_INGRESS", "CONFIG_NET_CLS_ACT",
    "CONFIG_VETH", "kernel headers", "pin root", "bcc (python3-bpfcc)", "libbpf.so.1",
    "pyroute2", "ip", "tc", "ethtool", "nsenter",
}
PROBES = {
    "probe: compile", "probe: load and test-run SCHED_CLS", "probe: load and test-run XDP",
    "probe: pin a map", "probe: veth + clsact + bpf filter", "probe: XDP attach (generic)",
}


def doctor(*args: str, env: dict | None = None, expect: int = 0) -> dict:
    r = CliRunner().invoke(main, ["doctor", *args, "-o", "json"], env=env)
    assert r.exit_code == expect, (r.output, r.exception)
    data = json.loads(r.stdout)
    assert data["version"] == 1
    return data


def by_name(data: dict) -> dict[str, dict]:
    return {c["name"]: c for c in data["checks"]}


def test_doctor_passes_here():
    netns_before = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout.split())
    data = doctor()
    checks = by_name(data)
    assert data["ok"] is True and data["probe"] is True
    assert REQUIRED_NAMES | PROBES <= set(checks)
    for name in REQUIRED_NAMES | PROBES:
        assert checks[name]["status"] == "ok", checks[name]
        assert checks[name]["required"] and checks[name]["fix"] is None
    assert data["summary"]["missing"] == 0
    assert data["summary"]["ok"] == sum(c["status"] == "ok" for c in data["checks"])
    assert "bcc 0." in checks["bcc (python3-bpfcc)"]["detail"]
    assert checks["tshark"]["required"] is False and checks["iperf3"]["required"] is False
    assert "returned 0" in checks["probe: load and test-run SCHED_CLS"]["detail"]
    # The probe leaves nothing behind: no namespace, no pinned file.
    netns_after = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                                     text=True).stdout.split())
    assert not {n for n in netns_after - netns_before if n.startswith("cn2m-doctor")}
    assert not [n for n in os.listdir("/sys/fs/bpf") if n.startswith("cn2m-doctor")]


def test_doctor_table():
    r = CliRunner().invoke(main, ["doctor", "--no-probe"])
    assert r.exit_code == 0, r.output
    assert "All required checks pass" in r.stdout and "CAP_BPF" in r.stdout
    assert "The live probe was skipped" in r.stdout


def test_pin_root_not_on_bpffs(tmp_path):
    bogus = str(tmp_path / "nope" / "cn2mirror")
    data = doctor("--no-probe", "--pin-root", bogus, expect=1)
    check = by_name(data)["pin root"]
    assert data["ok"] is False and check["status"] == "missing" and check["required"]
    assert "is not on a bpffs" in check["detail"] and bogus in check["detail"]
    assert "mount -t bpf bpf" in check["fix"] and "/sys/fs/bpf" in check["fix"]
    r = CliRunner().invoke(main, ["doctor", "--no-probe", "--pin-root", bogus])
    assert r.exit_code == 1
    assert "How to fix:" in r.stdout and "[missing] pin root" in r.stdout


def test_pin_root_under_bpffs_is_fine():
    root = f"/sys/fs/bpf/cn2m-test-doctor-{uuid.uuid4().hex[:8]}"
    check = by_name(doctor("--no-probe", "--pin-root", root))["pin root"]
    assert check["status"] == "ok" and "will be created in /sys/fs/bpf" in check["detail"]
    assert not os.path.exists(root)  # doctor only looks


def _path_with(tmp_path, tools: list[str]) -> str:
    """A PATH holding only these tools (symlinked from the real ones)."""
    d = tmp_path / "bin"
    d.mkdir()
    for t in tools:
        os.symlink(shutil.which(t), d / t)
    return str(d)


def test_optional_tools_missing_warns(tmp_path):
    path = _path_with(tmp_path, ["ip", "tc", "ethtool", "nsenter"])
    data = doctor("--no-probe", env={"PATH": path})
    checks = by_name(data)
    assert data["ok"] is True and data["summary"]["warn"] >= 2
    for tool, package in (("tshark", "tshark"), ("iperf3", "iperf3")):
        assert checks[tool]["status"] == "warn" and "not found in PATH" in checks[tool]["detail"]
        assert checks[tool]["fix"] == f"apt-get install {package}"


def test_required_tool_missing_fails(tmp_path):
    path = _path_with(tmp_path, ["ip", "tc", "nsenter"])
    data = doctor("--no-probe", env={"PATH": path}, expect=1)
    ethtool = by_name(data)["ethtool"]
    assert ethtool["status"] == "missing" and ethtool["fix"] == "apt-get install ethtool"
    assert data["summary"]["missing"] == 1  # nothing else


def test_probe_without_ip_says_so(tmp_path):
    path = _path_with(tmp_path, ["tc", "ethtool", "nsenter"])
    data = doctor(env={"PATH": path}, expect=1)
    checks = by_name(data)
    assert checks["ip"]["status"] == "missing"
    veth = checks["probe: veth + clsact + bpf filter"]
    assert veth["status"] == "missing" and "ip tool" in veth["detail"]
    assert checks["probe: load and test-run XDP"]["status"] == "ok"
