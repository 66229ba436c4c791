"""The datapath without CAP_SYS_ADMIN: the DaemonSet's capabilities (BPF, PERFMON,
NET_ADMIN and nothing else), checked on this kernel with real programs and packets.

A child process enters a throwaway network namespace (setns, while it still may), then
drops every capability but those from its bounding set and execs: the program it runs
has no others (root's capabilities on exec are the bounding set). There it compiles and
loads the programs (bcc, in the loader subprocess), creates and pins the maps under a
pin root of its own, sets up the mirror port, attaches to a pod interface, writes a
policy and runs packets through the classifier (BPF_PROG_TEST_RUN).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
KEEP = {CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN}  # manifests/deploy/daemonset.yaml

# Runs as: python -c LAUNCH <netns> <pin root> <keep caps, comma-separated>
LAUNCH = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/var/run/netns/" + sys.argv[1], os.O_RDONLY)
    assert libc.setns(fd, 0x40000000) == 0, "setns"
    keep = {int(c) for c in sys.argv[3].split(",")}
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        if cap not in keep:
            assert libc.prctl(24, cap, 0, 0, 0) == 0, f"PR_CAPBSET_DROP {cap}"  # noqa
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[4], sys.argv[2]])
""")

AGENT = textwrap.dedent("""
    import json, sys
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from cn2mirror.agent.bpfsys import test_run
    from cn2mirror.agent.node import Node
    from cn2mirror.agent.pinned import sum_counters
    from cn2mirror.agent.state import (Cidr, DeliveryMode, Destination, Interface,
                                       NodeState, Policy, Rule)
    eff = int(next(l for l in open("/proc/self/status") if l.startswith("CapEff"))
              .split()[1], 16)
    node = Node(sys.argv[1])
    node.start()
    state = NodeState("node1",
        interfaces=(Interface("demo/web", session_id=7, host_ifname="vpod"),),
        policies=(Policy("demo/p", (Rule("demo/p", 0, None, (Cidr("198.18.20.0/24"),),
                                         (), "an", 1001),), frozenset({"demo/web/eth0"})),),
        destinations=(Destination("an", DeliveryMode.JMIRROR,
                                  analyzer_ip="198.18.200.10"),))
    result = node.apply(state)
    pkt = bytes(Ether() / IP(src="198.18.10.2", dst="198.18.20.5") / TCP(flags="S"))
    rc, out, _ = test_run(node.datapath.prog_fd("classify_from_pod"), pkt,
                          ifindex=node.datapath.ifindex("vpod"))
    slot = next(s for s, (p, i) in result.plan.rule_slots.items() if p == "demo/p")
    cloned = sum_counters(node.datapath.maps["stats_rule"].lookup(
        slot.to_bytes(4, "little"))).cloned
    node.stop(cleanup=True)
    print(json.dumps({"cap_eff": eff, "rc": rc, "same": out == pkt, "cloned": cloned,
                      "problems": result.problems}))
""")


def run_agent_with(keep: set[int]) -> subprocess.CompletedProcess:
    tag = uuid.uuid4().hex[:6]
    netns, pin_root = f"cn2m-lp-{tag}", f"/sys/fs/bpf/cn2m-test-{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "vpod", "type", "veth", "peer", "name", "vpeer"],
                    ["link", "set", "vpod", "up"], ["link", "set", "vpeer", "up"],
                    ["link", "add", "an0", "type", "veth", "peer", "name", "an1"],
                    ["link", "set", "an0", "up"], ["link", "set", "an1", "up"],
                    ["addr", "add", "198.18.200.1/24", "dev", "an0"]):
            subprocess.run(["ip", "-n", netns, *cmd], check=True)
        # What the init container leaves: the project's own directory, root's only.
        os.makedirs(pin_root, mode=0o700)
        return subprocess.run(
            [sys.executable, "-c", LAUNCH, netns, pin_root,
             ",".join(str(c) for c in sorted(keep)), AGENT],
            capture_output=True, text=True, timeout=180)
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["rm", "-rf", pin_root], capture_output=True)


def test_the_datapath_works_with_bpf_perfmon_and_net_admin_only():
    r = run_agent_with(KEEP)
    assert r.returncode == 0, r.stderr[-3000:]
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["cap_eff"] == sum(1 << c for c in KEEP)  # truly without SYS_ADMIN
    assert answer["rc"] == -1 and answer["same"]  # TC_ACT_UNSPEC, packet unchanged
    assert answer["cloned"] == 1  # the copy was made
    assert answer["problems"] == {}


def test_without_cap_bpf_it_fails_so_the_check_means_something():
    r = run_agent_with(KEEP - {CAP_BPF})
    assert r.returncode != 0


def test_a_pin_root_on_bpffs_needs_no_mount_and_is_made_root_only(pin_root):
    from cn2mirror.agent.datapath import ensure_bpffs, on_bpffs

    assert on_bpffs("/sys/fs/bpf") and not on_bpffs("/tmp") and not on_bpffs("/run")
    assert on_bpffs(pin_root + "/not/yet")  # judged by the nearest existing ancestor
    ensure_bpffs(pin_root)
    assert os.stat(pin_root).st_mode & 0o777 == 0o700
