"""Where the classifier sits among a CNI's own programs, and how it stays there.

Real programs on a lab node's pod veths (agent/lab.py), real UDP between pods, copies
read at the analyzer: the classifier attached with tcx at the head of the chain in front
of a stand-in CNI (tests/cni_standin.py), the legacy clsact fallback, self-healing
against a CNI that deletes legacy filters, and an agent restart with tcx links.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import uuid

import pytest
from scapy.layers.inet import IP, UDP

from cn2mirror.agent import bpfsys
from cn2mirror.agent.datapath import MIRROR_RX
from cn2mirror.agent.lab import ns_sh
from cn2mirror.agent.netns import entered
from cn2mirror.agent.node import Node
from cn2mirror.agent.runtime import Agent
from cn2mirror.agent.state import Interface, NodeState, Policy, PortRange, Rule

from .builders import as_fresh_node, default_lab, started_node
from .cni_standin import TEST_PORT, StandInCni, delete_legacy_filters, ifindex, legacy_filters
from .test_datapath_e2e import LOCAL_AN, Capture, copies_in, jm, link

pytestmark = [pytest.mark.netns, pytest.mark.bpf]

N = 40  # datagrams each way
WEB_SID, CLIENT_SID = 501, 502


@pytest.fixture(scope="module")
def lab():
    with default_lab("cn2a") as lab:
        yield lab


def both_pods_state(lab) -> NodeState:
    """web and client, each mirrored (UDP TEST_PORT, both directions) to the local
    analyzer."""
    ifaces = tuple(Interface(f"demo/{name}", session_id=sid,
                             ips=(lab.pods[name].ip, lab.pods[name].ip6))
                   for name, sid in (("web", WEB_SID), ("client", CLIENT_SID)))
    pol = Policy("demo/p", (Rule("demo/p", 0, None, None, (PortRange(17, TEST_PORT, TEST_PORT),),
                                 "local", 77),),
                 frozenset({"demo/web/eth0", "demo/client/eth0"}))
    return NodeState("node1", interfaces=ifaces, policies=(pol,),
                     destinations=(jm(LOCAL_AN, "local"),))


class Listener:
    """A UDP socket on a pod's address, port TEST_PORT, counting what arrives."""

    def __init__(self, pod):
        with entered(pod.netns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((pod.ip, TEST_PORT))
        self.sock.settimeout(0.05)
        self.got = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self.sock.recv(2048)
                self.got += 1

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


def send(lab, src: str, dst: str, n: int = N) -> None:
    code = ("import socket,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"for i in range({n}):\n s.sendto(i.to_bytes(4,'big'),('{lab.pods[dst].ip}',"
            f"{TEST_PORT}));time.sleep(0.002)")
    ns_sh(lab.pods[src].netns, "python3", "-c", code)


def copy_counts(cps, lab) -> dict[tuple[int, str, str], int]:
    """(session id, source pod, destination pod) -> copies of test datagrams."""
    by_ip = {p.ip: name for name, p in lab.pods.items()}
    out: dict[tuple[int, str, str], int] = {}
    for _, _, sid, inner in cps:
        pkt = IP(inner)
        if UDP in pkt and pkt[UDP].dport == TEST_PORT:
            key = (sid, by_ip.get(pkt.src, pkt.src), by_ip.get(pkt.dst, pkt.dst))
            out[key] = out.get(key, 0) + 1
    return out


def exchange(lab) -> tuple[dict, dict[str, int]]:
    """N datagrams client -> web and N web -> client: the copies by (session, src, dst)
    and what each pod's socket received."""
    cap = Capture(lab.pods["analyzer"].netns, bpf_filter="udp port 30030", sink=30030)
    listeners = {name: Listener(lab.pods[name]) for name in ("web", "client")}
    try:
        send(lab, "client", "web")
        send(lab, "web", "client")
        cps = copies_in(cap.stop())
        time.sleep(0.1)
    finally:
        cap.close()
        for lst in listeners.values():
            lst.close()
    return copy_counts(cps, lab), {name: lst.got for name, lst in listeners.items()}


def standins(lab) -> list[StandInCni]:
    """The CNI's programs: TC_ACT_OK on both directions of web's veth; on client's veth
    ingress (from client) TC_ACT_REDIRECT of the test flow to web's veth."""
    n1 = lab.nodes["node1"].netns
    web = lab.pods["web"]
    made = []
    try:
        made.append(StandInCni(n1, web.host_ifname, "ingress", "pass"))
        made.append(StandInCni(n1, web.host_ifname, "egress", "pass"))
        made.append(StandInCni(n1, lab.pods["client"].host_ifname, "ingress", "redirect",
                               target_ifindex=ifindex(n1, web.host_ifname), dst_mac=web.mac,
                               src_mac=link(n1, web.host_ifname)["address"]))
    except BaseException:
        for s in made:
            s.close()
        raise
    return made


ALL_FOUR = {(CLIENT_SID, "client", "web"): N, (WEB_SID, "client", "web"): N,
            (WEB_SID, "web", "client"): N, (CLIENT_SID, "web", "client"): N}


def test_legacy_filters_behind_a_tcx_cni_see_nothing_and_say_so(lab):
    """The defect tcx fixes: with the legacy clsact attachment (forced) behind the
    stand-in's tcx programs, web's and client's interfaces get no copies of what the
    stand-in passes or redirects, and the attachment check reports our filter is not
    first (not repairable in legacy mode)."""
    with started_node(lab, "legacy") as node:
        node.apply(both_pods_state(lab))
        cni = standins(lab)
        try:
            copies, received = exchange(lab)
            states = node.datapath.hook_states(cni[0].ifindex)
            repairs = node.heal()
            unrepaired = dict(node.attachment_report()["unrepaired"])
        finally:
            for s in cni:
                s.close()
    assert received == {"web": N, "client": N}
    # Only client's egress (no stand-in there) still copies web -> client.
    assert copies == {(CLIENT_SID, "web", "client"): N}
    assert all("not first in the chain: after cni_pass (tcx)" in st.problem for st in states)
    assert repairs == []
    assert any("vweb" in what or "demo/web" in what for what in unrepaired)


def test_a_cni_deleting_legacy_filters(lab, state_dir):
    """A stand-in CNI deletes every legacy tc filter of web's and client's veths after
    we attached (Cilium's loader does). With tcx nothing changes. With the legacy
    fallback mirroring stops, and the agent's next resync puts the filters back, counts
    and reports each repair; the mirror port's own programs are healed the same way."""
    state = both_pods_state(lab)
    n1 = lab.nodes["node1"].netns
    pods = [lab.pods[name].host_ifname for name in ("web", "client")]
    # tcx: the deletion finds nothing of ours.
    with started_node(lab, "tcx") as node:
        node.apply(state)
        for dev in pods:
            delete_legacy_filters(n1, dev)
        copies, _ = exchange(lab)
        assert copies == ALL_FOUR
        assert node.heal() == [] and sum(node.repairs.values()) == 0
    # legacy: deleted, nothing copied; one resync restores it.
    with started_node(lab, "legacy") as node:
        agent = Agent(_NoSource(), "node1", node, state_dir, resync_interval=60)
        agent.desired_state = state
        assert agent.resync().repairs == ()  # all in place
        for dev in pods:
            assert "classify" in legacy_filters(n1, dev)
            delete_legacy_filters(n1, dev)
            assert "classify" not in legacy_filters(n1, dev)
        copies, _ = exchange(lab)
        assert copies == {}
        report = agent.resync()
        assert len(report.repairs) == 4, report.repairs  # 2 interfaces x 2 directions
        assert all("no legacy attachment" in r for r in report.repairs)
        assert node.repairs["missing"] == 4
        assert agent.status()["last"]["repairs"] == list(report.repairs)
        copies, _ = exchange(lab)
        assert copies == ALL_FOUR
        # The mirror port: its wrapper's filter deleted, put back by the next resync.
        ns_sh(n1, "tc", "filter", "del", "dev", MIRROR_RX, "ingress")
        assert node.datapath.mirror_port_problems() == [
            f"mirror_wrap is not attached to {MIRROR_RX}"]
        report = agent.resync()
        assert node.repairs["mirror_port"] == 1 and len(report.repairs) == 1
        assert node.datapath.mirror_port_problems() == []
        assert "repairs_total" in "".join(f.name for f in node.collect())


class _NoSource:
    def start(self, on_change):
        pass

    def stop(self):
        pass

    def ready(self):
        return True


def _our_links(netns: str, idx: int) -> dict[str, list[int]]:
    out = {}
    with entered(netns):
        for name, kind in (("in", bpfsys.BPF_TCX_INGRESS), ("eg", bpfsys.BPF_TCX_EGRESS)):
            out[name] = bpfsys.tcx_query(idx, kind)[1]
    return out


def test_tcx_links_outlive_the_agent_and_are_replaced_in_place_on_restart(lab):
    """An agent restart with tcx links: the new programs replace the old ones in the
    same links (BPF_LINK_UPDATE: same link ids, no second link), and a stream running
    across the restart and one opened in the middle of it (after the new programs were
    loaded and the rule walk's continuation repointed, before the links were updated)
    are both mirrored in full; the maps are adopted as they are (nothing rewritten)."""
    n1 = lab.nodes["node1"].netns
    pin_root = f"/sys/fs/bpf/cn2m-test-{uuid.uuid4().hex[:6]}"
    state = both_pods_state(lab)
    web_idx = ifindex(n1, lab.pods["web"].host_ifname)
    first = Node(pin_root, netns=n1, attach_mode="tcx")
    second = None
    cap = Capture(lab.pods["analyzer"].netns, bpf_filter="udp port 30030", sink=30030)
    listener = Listener(lab.pods["web"])
    try:
        first.start()
        first.apply(state)
        links_before = _our_links(n1, web_idx)
        progs_before = {st.direction: [e.prog_id for e in st.chain if e.ours]
                        for st in first.datapath.hook_states(web_idx)}

        def stream(sport: int, count: int):
            code = ("import socket,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                    f"s.bind(('{lab.pods['client'].ip}',{sport}))\n"
                    f"for i in range({count}):\n s.sendto(i.to_bytes(4,'big'),"
                    f"('{lab.pods['web'].ip}',{TEST_PORT}));time.sleep(0.005)")
            ns_sh(lab.pods["client"].netns, "python3", "-c", code)

        before = threading.Thread(target=stream, args=(41001, 600))
        before.start()
        time.sleep(0.3)
        first.stop(cleanup=False)  # the agent exits; links, programs and maps stay
        second = Node(pin_root, netns=n1, attach_mode="tcx")
        second.datapath.load()  # new programs pinned, eval_progs repointed
        during = threading.Thread(target=stream, args=(41002, 100))
        during.start()
        time.sleep(0.2)  # the new flow's first packets are evaluated in this window
        second.datapath.load = lambda: None  # loaded above: the rest of start()
        second.start()  # mirror port, adopts the links
        assert second.apply(state).changes == 0  # adopted the maps: nothing to rewrite
        links_after = _our_links(n1, web_idx)
        progs_after = {st.direction: [e.prog_id for e in st.chain if e.ours]
                       for st in second.datapath.hook_states(web_idx)}
        before.join(timeout=60)
        during.join(timeout=60)
        cps = copies_in(cap.stop())
    finally:
        cap.close()
        listener.close()
        (second or first).stop(cleanup=True)
        subprocess.run(["rm", "-rf", pin_root])
    assert links_after == links_before and all(len(v) == 1 for v in links_after.values())
    assert all(progs_after[d] != progs_before[d] for d in progs_before)  # replaced
    seqs: dict[tuple[int, int], set[int]] = {}
    for _, _, sid, inner in cps:
        pkt = IP(inner)
        if UDP in pkt and pkt[UDP].dport == TEST_PORT:
            key = (sid, pkt[UDP].sport)
            seqs.setdefault(key, set()).add(int.from_bytes(bytes(pkt[UDP].payload)[:4], "big"))
    for sid in (CLIENT_SID, WEB_SID):  # at client's veth (from pod) and web's (to pod)
        assert seqs.get((sid, 41001)) == set(range(600)), sid
        assert seqs.get((sid, 41002)) == set(range(100)), sid


def test_attach_mode_is_checked():
    from cn2mirror.agent.datapath import Datapath, DatapathError

    dp = Datapath("/sys/fs/bpf/cn2m-test-unused")
    with pytest.raises(DatapathError, match="attach mode must be one of"):
        dp.set_attach_mode("netkit")


# Tests that need a node of their own (legacy mode, restarts) come before the first
# test of the shared tcx node (file order): two nodes in one namespace would share the
# mirror port, and the shared node lives until the module ends.
@pytest.fixture(scope="module")
def shared_tcx_node(lab):
    with started_node(lab, "tcx") as node:
        yield node


@pytest.fixture
def tcx_node(lab, shared_tcx_node):
    """The module's tcx node (a load compiles and verifies the programs: about 8 s) as a
    fresh one: nothing attached or applied, no repairs counted, host-side attachment."""
    node = shared_tcx_node
    with as_fresh_node(lab, node):
        node.repairs.clear()
        node.datapath.pod_side = False
        try:
            yield node
        finally:
            node.apply(NodeState("node1"))  # pod-side links too, while pod_side says so
            node.datapath.pod_side = False


def test_tcx_runs_first_in_front_of_a_cni_that_passes_and_redirects(lab, tcx_node):
    """Stand-in for Cilium >= 1.16 (tcx links at the tail, verdicts TC_ACT_OK and
    TC_ACT_REDIRECT, see tests/cni_standin.py) on web's and client's veths. Our tcx links
    at the head see every packet in both directions of both pods: every datagram copied
    once at each pod's interface, while the stand-in's counters prove it ran on every
    datagram and its verdicts held (the redirected datagrams all reached web)."""
    with contextlib.nullcontext(tcx_node) as node:
        assert node.datapath.mode() == "tcx"
        result = node.apply(both_pods_state(lab))
        assert result.problems == {}
        cni = standins(lab)
        try:
            copies, received = exchange(lab)
            seen = [s.seen() for s in cni]
            web_idx = cni[0].ifindex
            states = node.datapath.hook_states(web_idx)
        finally:
            for s in cni:
                s.close()
    assert received == {"web": N, "client": N}
    assert seen == [N, N, N]  # web in (web -> client), web out and client in (to web)
    assert copies == ALL_FOUR
    for st in states:  # ours first, the stand-in behind it
        assert st.problem == "" and st.position == 1, st
        assert [e.prog_id for e in st.chain if e.hook == "tcx" and not e.ours] == \
            [cni[0 if st.direction == "ingress" else 1].prog_id]


def test_tcx_position_is_restored_when_a_program_jumps_the_queue(lab, tcx_node):
    """Something attaches with BPF_F_BEFORE in front of our link: the check sees we are
    no longer first and puts our link back at the head (counted)."""
    n1 = lab.nodes["node1"].netns
    web = lab.pods["web"]
    with contextlib.nullcontext(tcx_node) as node:
        node.apply(both_pods_state(lab))
        cni = StandInCni(n1, web.host_ifname, "ingress", "pass", at_head=True)
        try:
            st = node.datapath.hook_states(cni.ifindex)[0]
            assert st.position == 2 and "not first" in st.problem
            repairs = node.heal()
            assert len(repairs) == 1 and node.repairs["position"] == 1
            st = node.datapath.hook_states(cni.ifindex)[0]
            assert st.position == 1 and st.problem == ""
            copies, _ = exchange(lab)
            assert copies[(WEB_SID, "web", "client")] == N
        finally:
            cni.close()


def test_show_interfaces_and_doctor_say_how_and_where_we_are_attached(lab, tcx_node,
                                                                    tmp_path):
    """`show interfaces` and `doctor` read the chains live: tcx, first of two behind
    which the stand-in runs; once a program jumps the queue, both say we are second and
    behind what."""
    import json

    from click.testing import CliRunner

    from cn2mirror.cli.main import main

    n1 = lab.nodes["node1"].netns
    web = lab.pods["web"]

    def cli(*args):
        r = CliRunner().invoke(main, [*args, "-o", "json"])
        assert r.exit_code == 0, (r.output, r.exception)
        return json.loads(r.stdout)

    with contextlib.nullcontext(tcx_node) as node:
        node.apply(both_pods_state(lab))
        pin = node.datapath.pin_root
        show = ("show", "interfaces", "--netns", n1, "--pin-root", pin, "--state-dir",
                str(tmp_path))
        tail = StandInCni(n1, web.host_ifname, "ingress", "pass")
        try:
            by_idx = {i["ifindex"]: i["attachment"] for i in cli(*show)["interfaces"]}
            a = by_idx[tail.ifindex]
            assert a["attach"] == "tcx"
            assert a["ingress"] == {"position": 1, "of": 2, "ahead": [], "problem": ""}
            assert a["egress"] == {"position": 1, "of": 1, "ahead": [], "problem": ""}
            checks = {c["name"]: c for c in cli("doctor", "--no-probe", "--netns", n1,
                                                 "--pin-root", pin)["checks"]}
            assert checks["tcx"]["status"] == "ok"
            in_use = checks["attachments in use"]
            assert in_use["status"] == "ok", in_use["detail"]
            assert checks["attachments in use"]["detail"].startswith(
                "tcx on 2 interface(s); first in every chain")
            head = StandInCni(n1, web.host_ifname, "egress", "pass", at_head=True)
            try:
                a = {i["ifindex"]: i["attachment"] for i in cli(*show)["interfaces"]}[
                    tail.ifindex]
                assert a["egress"]["position"] == 2 and a["egress"]["ahead"] == [
                    "cni_pass (tcx)"]
                table = CliRunner().invoke(main, list(show)).stdout
                assert "tcx" in table and "eg 2/2!" in table and "not first" in table
                checks = {c["name"]: c for c in cli("doctor", "--no-probe", "--netns", n1,
                                                     "--pin-root", pin)["checks"]}
                assert checks["attachments in use"]["status"] == "warn"
                assert "not first in the chain: after cni_pass (tcx)" in \
                    checks["attachments in use"]["detail"]
            finally:
                head.close()
        finally:
            tail.close()


def peer_standins(lab) -> list[StandInCni]:
    """Stand-in for Cilium with BPF host routing: client's packets to web are delivered
    by bpf_redirect_peer from client's veth ingress straight into web's eth0 (web's
    host-side veth never sees them leave); web's own packets meet a TC_ACT_OK program on
    its veth ingress."""
    n1 = lab.nodes["node1"].netns
    web = lab.pods["web"]
    made = [StandInCni(n1, web.host_ifname, "ingress", "pass")]
    try:
        made.append(StandInCni(n1, lab.pods["client"].host_ifname, "ingress",
                               "redirect_peer", target_ifindex=ifindex(n1, web.host_ifname),
                               dst_mac=web.mac, src_mac=link(n1, web.host_ifname)["address"]))
    except BaseException:
        made[0].close()
        raise
    return made


def test_redirect_peer_delivery_is_mirrored_in_both_directions_from_the_pod_side(
        lab, tcx_node):
    """Pod-bound traffic delivered with bpf_redirect_peer skips the host-side veth's
    egress: attached there (tcx, head), web's to-pod copies are missing. With the
    pod-side attachment (the to-pod direction classified on the pod's eth0 ingress, in
    its namespace) every datagram is copied once in each direction at each pod; the
    copies made in the pod come back over its veth and are taken off before the CNI's
    program there (its counter sees only web's own datagrams), and the production
    verdicts hold (web received every redirected datagram)."""
    state = both_pods_state(lab)
    with contextlib.nullcontext(tcx_node) as node:
        node.apply(state)
        cni = peer_standins(lab)
        try:
            copies, received = exchange(lab)
            seen = [s.seen() for s in cni]
        finally:
            for s in cni:
                s.close()
        assert received == {"web": N, "client": N} and seen == [N, N]
        assert copies.get((WEB_SID, "client", "web"), 0) == 0  # the defect: never seen
        assert copies[(CLIENT_SID, "client", "web")] == N

        # The same node (one load fewer), everything detached, then pod-side.
        node.apply(NodeState("node1"))
        assert node.datapath.attached_ifindexes() == set()
        node.datapath.pod_side = True
        assert node.apply(state).problems == {}
        web_idx = ifindex(lab.nodes["node1"].netns, lab.pods["web"].host_ifname)
        states = {st.direction: st for st in node.datapath.hook_states(web_idx)}
        assert set(states) == {"ingress", "pod ingress"}
        assert all(st.problem == "" and st.position == 1 for st in states.values()), states
        cni = peer_standins(lab)
        try:
            copies, received = exchange(lab)
            seen = [s.seen() for s in cni]
        finally:
            for s in cni:
                s.close()
        assert node.heal() == []
        # The pod-side link detached behind our back: the resync's check makes it again.
        fd = bpfsys.obj_get(node.datapath.link_pin(web_idx, "peer"))
        bpfsys.link_detach(fd)
        os.close(fd)
        assert {st.direction: st.problem for st in node.datapath.hook_states(web_idx)}[
            "pod ingress"] == "no tcx attachment"
        assert len(node.heal()) == 1 and node.repairs["missing"] == 1
        assert all(st.problem == "" for st in node.datapath.hook_states(web_idx))
        after_repair, _ = exchange(lab)
    assert received == {"web": N, "client": N}
    assert seen == [N, N]  # the CNI ran on every datagram, and never saw a copy
    assert copies == ALL_FOUR
    assert after_repair == ALL_FOUR
