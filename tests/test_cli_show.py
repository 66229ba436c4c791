"""`cn2mirror show`, `explain` and `ids` against a real datapath.

A lab (agent/lab.py) with the agent's Node on node1, its maps pinned under a pin root of
this test's own. The node's state comes from the lab's pods plus a policy and two
MirrorDestinations, compiled with compile_node; names.json is written with describe()
as the agent does. Traffic is real (ping and a UDP datagram from client to web); every
number checked is read back from the pinned maps by the CLI, no map is mocked. Then the
node's process-side state is dropped (datapath.close(): pins and attachments stay, as
when the agent dies) and `show` must still work from the pins.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cn2mirror.agent import layout as L
from cn2mirror.agent.compiler import compile_node, id_table, session_table
from cn2mirror.agent.lab import Lab, ns_sh
from cn2mirror.agent.node import Node, describe
from cn2mirror.agent.snapshot import snapshot_from_objects
from cn2mirror.cli.main import main

pytestmark = [
    pytest.mark.netns,
    pytest.mark.bpf,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, BPF)"),
]

WEB, CLIENT, ANALYZER, EXT = "198.18.1.2", "198.18.1.3", "198.18.1.10", "198.19.1.10"
UDP_SPORT, UDP_DPORT = 40000, 5353
POLICY = "demo/mirror-web"
DROP_NAMES = {d.name.lower() for d in L.Drop}


def objects(lab: Lab) -> list[dict]:
    objs = lab.pod_objects()
    for o in objs:
        if o["kind"] == "Pod" and o["metadata"]["name"] == "client":
            o["metadata"]["annotations"]["core.juniper.net/mirror-destination"] = "ext"
    objs += [
        {"apiVersion": "mirror.cn2mirror.io/v1alpha1", "kind": "MirrorDestination",
         "metadata": {"name": "analyzer1",
                      "labels": {"core.juniper.net/analyzer-pod-selector": "analyzer1"}},
         "spec": {"juniperHeader": True, "udpPort": 30030}},
        {"apiVersion": "mirror.cn2mirror.io/v1alpha1", "kind": "MirrorDestination",
         "metadata": {"name": "ext"},
         "spec": {"externalAnalyzer": True, "analyzerIP": EXT, "trafficDirection": "egress"}},
        {"apiVersion": "core.contrail.juniper.net/v1alpha1", "kind": "ContrailSecurityPolicy",
         "metadata": {"name": "mirror-web", "namespace": "demo"},
         "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                  "action": "pass",
                  "rules": [
                      {"ports": [{"protocol": "TCP", "port": 80}],
                       "secondaryActions": {"mirrorTo": "analyzer1"}},
                      {"ports": [{"protocol": "UDP", "port": UDP_DPORT}],
                       "secondaryActions": {"mirrorTo": "analyzer1"}},
                      {"ports": [{"protocol": "ICMP"}],
                       "secondaryActions": {"mirrorTo": "analyzer1"}},
                  ]}},
    ]
    return objs


def send_traffic(lab: Lab, count: int = 3) -> None:
    client = lab.pods["client"].netns
    ns_sh(client, "ping", "-c", str(count), "-i", "0.2", "-W", "1", WEB)
    # One UDP datagram with a known source port (nothing listens: web answers with an
    # ICMP port unreachable, a flow of its own).
    ns_sh(client, "/usr/bin/python3", "-c",
          "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
          f"s.bind(('', {UDP_SPORT})); s.sendto(b'cn2m', ('{WEB}', {UDP_DPORT}))")


class Env:
    def __init__(self, lab, node, state, result, pin_root, state_dir, source_dir):
        self.lab, self.node, self.state, self.result = lab, node, state, result
        self.pin_root, self.state_dir, self.source_dir = pin_root, state_dir, source_dir
        self.mids = {(r.policy, r.index): r.mirror_id for p in state.policies for r in p.rules}
        self.sids = {i.key: i.session_id for i in state.interfaces}
        self.port_mid = state.interface("demo/client/eth0").port_mirrors[0].mirror_id

    def run(self, *args: str, state_dir: str | None = None, pin_root: str | None = None,
            expect: int = 0):
        argv = list(args) + ["--pin-root", pin_root or self.pin_root,
                             "--state-dir", state_dir or self.state_dir]
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == expect, (argv, r.output, r.exception)
        return r

    def json(self, *args: str, **kw) -> dict:
        r = self.run(*args, "-o", "json", **kw)
        data = json.loads(r.stdout)
        assert data["version"] == 1
        return data


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    lab = Lab(prefix="cn2s" + uuid.uuid4().hex[:4])
    pin_root = f"/sys/fs/bpf/cn2m-test-{uuid.uuid4().hex[:8]}"
    node = None
    try:
        lab.up_default()
        objs = objects(lab)
        snapshot, errors = snapshot_from_objects(objs)
        assert not errors
        state = compile_node(snapshot, "node1")
        assert not state.errors, state.errors
        node = Node(pin_root=pin_root, netns=lab.nodes["node1"].netns)
        node.start()
        result = node.apply(state)
        assert not result.problems, result.problems
        state_dir = tmp_path_factory.mktemp("state")
        (state_dir / "names.json").write_text(json.dumps(describe(state, result)))
        source_dir = tmp_path_factory.mktemp("objects")
        (source_dir / "cluster.yaml").write_text(yaml.safe_dump_all(objs))
        send_traffic(lab)
        yield Env(lab, node, state, result, pin_root, str(state_dir), str(source_dir))
    finally:
        if node is not None:
            node.stop(cleanup=True)
        lab.down()
        assert not os.path.exists(pin_root)


# ---------------------------------------------------------------------- show
def test_show_interfaces(env):
    data = env.json("show", "interfaces")
    assert data["kind"] == "interfaces"
    assert data["names"]["available"] and data["names"]["node"] == "node1"
    assert data["names"]["mismatches"] == []
    by_pod = {i["pod"]: i for i in data["interfaces"]}
    assert set(by_pod) == {"demo/web", "demo/client"}
    web, client = by_pod["demo/web"], by_pod["demo/client"]
    assert web["interface"] == "demo/web/eth0" and web["pod_ifname"] == "eth0"
    assert web["ifindex"] == env.result.ifindexes["demo/web/eth0"]
    assert web["session_id"] == env.sids["demo/web/eth0"]
    assert web["flow_mirroring"] and web["policies"] == [POLICY]
    assert len(web["rule_slots"]) == 3
    assert web["port_mirror"] == {"egress": None, "ingress": None}
    assert not client["flow_mirroring"] and client["policies"] == []
    egress = client["port_mirror"]["egress"]
    assert egress["destination"] == "ext" and egress["mirror_id"] == env.port_mid
    assert egress["kind"] == "port" and egress["port_mirror"] == "demo/client/eth0"
    assert client["port_mirror"]["ingress"] is None

    table = env.run("show", "interfaces").stdout
    for text in ("demo/web", "demo/client", "eth0", str(env.sids["demo/web/eth0"]), POLICY,
                 "egress: ext"):
        assert text in table


def test_show_rules(env):
    data = env.json("show", "rules")
    rules = {(r["policy"], r["rule"]): r for r in data["rules"] if r["kind"] == "policy"}
    assert set(rules) == {(POLICY, 0), (POLICY, 1), (POLICY, 2)}
    for (policy, index), r in rules.items():
        assert r["mirror_id"] == env.mids[policy, index]
        assert r["destination"] == "analyzer1" and r["mirrors"]
    port = [r for r in data["rules"] if r["kind"] == "port"]
    assert len(port) == 1
    assert port[0]["port_mirror"] == "demo/client/eth0" and port[0]["direction"] == "egress"
    assert port[0]["mirror_id"] == env.port_mid and port[0]["destination"] == "ext"

    table = env.run("show", "rules").stdout
    assert POLICY in table and "analyzer1" in table and "port mirror demo/client/eth0" in table
    assert str(env.mids[POLICY, 2]) in table


def test_show_destinations(env):
    data = env.json("show", "destinations")
    by_name = {d["name"]: d for d in data["destinations"]}
    assert set(by_name) == {"analyzer1", "ext"}
    a = by_name["analyzer1"]
    assert a["mode"] == "jmirror4" and a["delivery"] == "jmirror"
    assert a["address"] == ANALYZER and a["udp_port"] == 30030
    assert a["analyzer_pod"] == "tools/analyzer"
    assert a["mtu"] >= 1280 and a["source_address"]
    assert a["vni"] is None and a["vlan_id"] is None
    assert by_name["ext"]["address"] == EXT and by_name["ext"]["analyzer_pod"] is None

    table = env.run("show", "destinations").stdout
    assert "analyzer1" in table and f"{ANALYZER} udp 30030" in table and "tools/analyzer" in table


def _flow(data: dict, proto: str, **ports) -> dict:
    """The one flow web<->client of `proto` (ICMP: the echo flow, not the port
    unreachable's) with those ports."""
    found = [f for f in data["flows"] if f["protocol"] == proto
             and f["interface"] == "demo/web/eth0"
             and {f["lo"]["address"], f["hi"]["address"]} == {WEB, CLIENT}
             and (proto != "icmp" or f["lo"]["echo_id"] is not None)
             and all(f[side]["port"] == port for side, port in ports.items())]
    assert len(found) == 1, data["flows"]
    return found[0]


def test_show_flows(env):
    data = env.json("show", "flows")
    icmp = _flow(data, "icmp")
    # Both directions in one entry: 3 requests and 3 replies crossed web's interface.
    assert icmp["packets"] >= 6 and icmp["bytes"] >= 6 * 84
    assert icmp["lo"]["address"] == WEB and icmp["hi"]["address"] == CLIENT
    assert icmp["initiator"] == "hi"  # the client pinged
    assert icmp["lo"]["echo_id"] == icmp["hi"]["echo_id"] and icmp["lo"]["port"] is None
    assert icmp["mirrored"] and not icmp["stale"] and not icmp["overflow"]
    assert icmp["pod"] == "demo/web" and icmp["generation"] == data["generation"]
    assert 0 <= icmp["idle_s"] <= icmp["age_s"] < 600
    [copy] = icmp["copies"]
    assert copy == {**copy, "destination": "analyzer1", "policy": POLICY, "rule": 2,
                    "mirror_id": env.mids[POLICY, 2], "kind": "policy"}

    udp = _flow(data, "udp", lo=UDP_DPORT, hi=UDP_SPORT)
    assert udp["initiator"] == "hi" and udp["packets"] >= 1
    assert [c["rule"] for c in udp["copies"]] == [1]

    only = env.json("show", "flows", "--pod", "demo/web", "--mirrored")["flows"]
    assert only and all(f["mirrored"] and f["pod"] == "demo/web" for f in only)

    table = env.run("show", "flows").stdout
    assert f"{WEB} <-> {CLIENT} id {icmp['lo']['echo_id']}" in table
    assert f"{WEB}:{UDP_DPORT} <-> {CLIENT}:{UDP_SPORT}" in table
    assert "demo/web/eth0" in table and f"analyzer1 (mid {env.mids[POLICY, 2]}" in table


def test_show_flows_filters(env):
    """Each filter keeps exactly the flows it names; filters combine."""
    everything = env.json("show", "flows")["flows"]
    icmp = _flow({"flows": everything}, "icmp")
    udp = _flow({"flows": everything}, "udp", lo=UDP_DPORT, hi=UDP_SPORT)

    def keys(*args: str) -> list:
        flows = env.json("show", "flows", *args)["flows"]
        return [(f["protocol"], f["lo"]["address"], f["lo"]["port"], f["lo"]["echo_id"],
                 f["hi"]["address"], f["hi"]["port"]) for f in flows]

    def key(f: dict) -> tuple:
        return (f["protocol"], f["lo"]["address"], f["lo"]["port"], f["lo"]["echo_id"],
                f["hi"]["address"], f["hi"]["port"])

    assert key(udp) in keys("--protocol", "udp")
    assert key(icmp) not in keys("--protocol", "udp")
    assert all(k[0] == "udp" for k in keys("--protocol", "17"))
    assert keys("--port", str(UDP_SPORT)) == [key(udp)]
    assert keys("--rule", f"{POLICY}#1") == [key(udp)]
    assert key(icmp) in keys("--rule", f"{POLICY}#2")
    assert set(keys("--rule", POLICY)) >= {key(icmp), key(udp)}
    assert keys("--rule", "demo/no-such-policy") == []
    assert keys("--mirror-id", str(env.mids[POLICY, 1])) == [key(udp)]
    assert set(keys("--destination", "analyzer1")) >= {key(icmp), key(udp)}
    assert keys("--destination", "analyzer1", "--protocol", "udp", "--port",
                str(UDP_DPORT)) == [key(udp)]
    assert keys("--destination", "nowhere") == []
    env.run("show", "flows", "--protocol", "bogus", expect=2)


def test_show_stats_watch(env):
    """--watch -o json: one JSON line per refresh, rates from the live counters while
    traffic flows (ping every 0.1 s: 10 echo requests and 10 replies a second, each
    copied by rule 2)."""
    client = env.lab.pods["client"].netns
    ping = subprocess.Popen(["ip", "netns", "exec", client, "ping", "-i", "0.1", "-c", "40",
                             WEB], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = env.run("show", "stats", "--watch", "--interval", "1", "--count", "2",
                    "-o", "json")
    finally:
        ping.kill()
        ping.wait()
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        data = json.loads(line)
        assert 0.9 <= data["interval_s"] <= 3
        rules = {(x["policy"], x["rule"]): x["rates"] for x in data["rules"]
                 if x["kind"] == "policy"}
        # About 20 copies a second; a busy machine (the whole suite, ip netns exec
        # starting ping) gives fewer: the check is that rates are live and where they
        # belong, not the machine's speed.
        assert 2 <= rules[POLICY, 2]["packets"] <= 26, rules
        assert rules[POLICY, 0]["packets"] == 0
        dests = {x["name"]: x["rates"] for x in data["destinations"]}
        assert dests["analyzer1"]["packets"] >= 2
        assert data["node"]["rates"]["packets"] >= 2

    table = env.run("show", "stats", "--watch", "--interval", "0.2", "--count", "1").stdout
    # (The screen-clearing escape is dropped by click when the output is not a terminal.)
    assert table.startswith("cn2mirror: rates over the last") and "COPIES/S" in table
    assert f"{POLICY} rule 2" in table and "analyzer1" in table


def test_show_stats(env):
    data = env.json("show", "stats")
    s = data["stats"]
    rules = {(r["policy"], r["rule"]): r for r in s["rules"] if r["kind"] == "policy"}
    icmp = rules[POLICY, 2]["counters"]
    assert icmp["cloned"] >= 6 and icmp["packets"] >= 6 and icmp["bytes"] > 6 * 84
    assert set(icmp["drops"]) == DROP_NAMES and icmp["dropped"] == sum(icmp["drops"].values())
    assert rules[POLICY, 1]["counters"]["packets"] >= 1
    assert rules[POLICY, 0]["counters"]["cloned"] == 0  # no TCP was sent
    port = next(r for r in s["rules"] if r["kind"] == "port")
    assert port["counters"]["cloned"] >= 3 and port["configured"]

    ifaces = {i["interface"]: i for i in s["interfaces"]}
    assert ifaces["demo/web/eth0"]["counters"]["packets"] >= 7
    assert ifaces["demo/web/eth0"]["session_id"] == env.sids["demo/web/eth0"]
    dests = {d["name"]: d for d in s["destinations"]}
    assert dests["analyzer1"]["counters"]["packets"] >= 7
    assert dests["ext"]["counters"]["cloned"] == 0  # cloned is counted per rule only

    node = s["node"]
    assert set(node["counters"]["drops"]) == DROP_NAMES == set(node["node_wide"]["drops"])
    total_cloned = sum(r["counters"]["cloned"] for r in s["rules"])
    assert node["counters"]["cloned"] == total_cloned > 0
    assert node["counters"]["packets"] == sum(r["counters"]["packets"] for r in s["rules"])

    table = env.run("show", "stats").stdout
    for text in (f"{POLICY} rule 2", "demo/web/eth0", "analyzer1", "Drops by reason",
                 *DROP_NAMES):
        assert text in table


def test_show_after_the_agent_died(env):
    """The agent's process state goes (datapath.close(): no cleanup); pins stay, the
    programs stay attached and keep mirroring, and show reads it all from the pins."""
    def echo_flows(data: dict) -> dict[int, dict]:
        return {f["lo"]["echo_id"]: f for f in data["flows"]
                if f["protocol"] == "icmp" and f["lo"]["echo_id"] is not None
                and f["interface"] == "demo/web/eth0"}

    def icmp_cloned() -> int:
        rules = env.json("show", "stats")["stats"]["rules"]
        return next(r for r in rules if r["rule"] == 2)["counters"]["cloned"]

    before, cloned = echo_flows(env.json("show", "flows")), icmp_cloned()
    env.node.datapath.close()
    send_traffic(env.lab, count=2)  # a new ping: a new echo id, a new flow
    after = echo_flows(env.json("show", "flows"))
    new = [f for echo_id, f in after.items() if echo_id not in before]
    assert len(new) == 1 and new[0]["packets"] >= 4 and new[0]["mirrored"]
    assert new[0]["initiator"] == "hi" and not new[0]["stale"]
    for echo_id, f in before.items():  # the old entries are still there, unchanged
        assert after[echo_id]["first_seen_ns"] == f["first_seen_ns"]
    assert icmp_cloned() >= cloned + 4
    for kind in ("interfaces", "rules", "destinations"):
        assert env.json("show", kind)[kind]
    assert "demo/web" in env.run("show", "interfaces").stdout


def test_names_unavailable(env, tmp_path):
    data = env.json("show", "rules", state_dir=str(tmp_path))
    assert data["names"]["available"] is False
    assert "names.json" in data["names"]["reason"]
    assert data["rules"] and all(r["policy"] is None and r["mirror_id"] for r in data["rules"])
    r = env.run("show", "interfaces", state_dir=str(tmp_path))
    assert "names unavailable" in r.stderr and "names unavailable" not in r.stdout
    assert str(env.sids["demo/web/eth0"]) in r.stdout  # numbers still shown


def test_stale_names_are_reported(env, tmp_path):
    names = json.loads(Path(env.state_dir, "names.json").read_text())
    slot = next(iter(names["rules"]))
    names["rules"][slot]["mirror_id"] = 12345
    names["problems"] = {"Interface demo/gone/eth0": "no host interface"}
    (tmp_path / "names.json").write_text(json.dumps(names))
    data = env.json("show", "rules", state_dir=str(tmp_path))
    assert any("12345" in m for m in data["names"]["mismatches"])
    assert data["names"]["problems"] == names["problems"]
    stderr = env.run("show", "rules", state_dir=str(tmp_path)).stderr
    assert "does not match the maps" in stderr
    assert "could not apply Interface demo/gone/eth0: no host interface" in stderr


# ---------------------------------------------------------------------- errors
def test_nothing_pinned(env, tmp_path):
    missing = f"/sys/fs/bpf/cn2m-test-none-{uuid.uuid4().hex[:8]}"
    r = env.run("show", "flows", pin_root=missing, expect=1)
    assert f"no pin root at {missing}" in r.output and "--pin-root" in r.output
    os.mkdir(missing)  # a directory on bpffs with nothing in it
    try:
        r = env.run("show", "stats", pin_root=missing, expect=1)
        assert f"nothing of cn2mirror is pinned under {missing}" in r.output
    finally:
        os.rmdir(missing)


def test_wrong_pin_root(env):
    # The parent of the real pin root: the error points at the pin set below it.
    r = env.run("show", "rules", pin_root="/sys/fs/bpf", expect=1)
    assert "nothing of cn2mirror is pinned under /sys/fs/bpf" in r.output
    assert env.pin_root in r.output
    r = env.run("show", "rules", pin_root="/tmp", expect=1)
    assert "/tmp" in r.output


def test_not_root(env):
    """Without privileges: a clear message and exit 1 (run as nobody, no capabilities)."""
    exe = Path(sys.executable).parent / "cn2mirror"
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                        "--inh-caps=-all", "--bounding-set=-all", str(exe), "show", "rules",
                        "--pin-root", env.pin_root, "--state-dir", env.state_dir],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "needs root" in r.stderr


def test_usage_errors_exit_2(env):
    r = CliRunner().invoke(main, ["show", "flows", "-o", "xml"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["explain", "--source", env.source_dir, "--pod", "demo/web",
                                  "--protocol", "tcp"])
    assert r.exit_code == 2 and "--dst" in r.output
    r = CliRunner().invoke(main, ["explain", "--source", env.source_dir, "--pod", "demo/web",
                                  "--src", WEB, "--dst", CLIENT, "--protocol", "tcp"])
    assert r.exit_code == 2 and "exactly one of --pod" in r.output
    r = CliRunner().invoke(main, ["explain", "--source", env.source_dir, "--pod", "demo/nope",
                                  "--dst", CLIENT, "--protocol", "tcp"])
    assert r.exit_code == 2 and "no pod demo/nope" in r.output
    r = CliRunner().invoke(main, ["explain", "--source", env.source_dir, "--pod", "demo/web",
                                  "--dst", CLIENT, "--protocol", "gre2"])
    assert r.exit_code == 2 and "--protocol" in r.output


# ---------------------------------------------------------------------- ids
def _invoke(*args: str, expect: int = 0):
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == expect, (args, r.output, r.exception)
    return r


def test_ids_from_names_and_objects(env):
    from_names = json.loads(_invoke("ids", "--state-dir", env.state_dir, "-o", "json").stdout)
    from_objects = json.loads(_invoke("ids", "--source", env.source_dir, "--node", "node1",
                                      "-o", "json").stdout)
    assert from_names["source"]["kind"] == "names"
    assert from_objects["source"]["kind"] == "objects"
    mids = id_table(env.state)
    sids = session_table(env.state)
    for data in (from_names, from_objects):
        assert {m["mirror_id"]: m["key"] for m in data["mirror_ids"]} == mids
        assert {s["session_id"]: s["interface"] for s in data["session_ids"]} == sids
        rule = next(m for m in data["mirror_ids"] if m["mirror_id"] == env.mids[POLICY, 2])
        assert rule == {**rule, "kind": "rule", "policy": POLICY, "rule": 2,
                        "destination": "analyzer1", "nodes": ["node1"]}
        port = next(m for m in data["mirror_ids"] if m["mirror_id"] == env.port_mid)
        assert port["kind"] == "port" and port["interface"] == "demo/client/eth0"
        assert port["pod"] == "demo/client" and port["destination"] == "ext"

    # All nodes of the objects when --node is not given: node2's db pod is not selected,
    # so the same ids come out.
    everywhere = json.loads(_invoke("ids", "--source", env.source_dir, "-o", "json").stdout)
    assert {m["mirror_id"] for m in everywhere["mirror_ids"]} == set(mids)

    sid = env.sids["demo/web/eth0"]
    one = json.loads(_invoke("ids", "--state-dir", env.state_dir, "--session-id", str(sid),
                             "-o", "json").stdout)
    assert one["mirror_ids"] == [] and [s["pod"] for s in one["session_ids"]] == ["demo/web"]
    table = _invoke("ids", "--state-dir", env.state_dir, "--mirror-id",
                    str(env.mids[POLICY, 2])).stdout
    assert f"{POLICY} rule 2" in table and "analyzer1" in table

    r = _invoke("ids", "--state-dir", env.state_dir, "--mirror-id", "7", expect=1)
    assert "mirror id 7 not known" in r.output


def test_ids_without_names(tmp_path):
    r = _invoke("ids", "--state-dir", str(tmp_path), expect=1)
    assert "names unavailable" in r.output and "--source" in r.output
    r = _invoke("ids", "--node", "node1", expect=2)


# ---------------------------------------------------------------------- explain
def _explain(env, *args: str, expect: int = 0) -> dict:
    r = _invoke("explain", "--source", env.source_dir, *args, "-o", "json", expect=expect)
    data = json.loads(r.stdout)
    assert data["version"] == 1
    return data


def test_explain_icmp_from_objects(env):
    data = _explain(env, "--pod", "demo/client", "--dst", "demo/web", "--protocol", "icmp")
    assert data["node"] == "node1"  # the pod's node
    assert data["flow"]["src_ip"] == CLIENT and data["flow"]["dst_ip"] == WEB
    by_iface = {i["interface"]: i for i in data["interfaces"]}
    web = by_iface["demo/web/eth0"]
    assert web["direction"] == "ingress" and web["session_id"] == env.sids["demo/web/eth0"]
    [pol] = web["policies"]
    assert pol["policy"] == POLICY and pol["matched"] and pol["orientation"] == "forward"
    assert pol["matching_rules"] == [2] and pol["deciding_rule"] == 2
    assert pol["mirror_id"] == env.mids[POLICY, 2] and pol["destination"] == "analyzer1"
    client = by_iface["demo/client/eth0"]
    assert client["direction"] == "egress" and client["policies"] == []
    copies = {(c["destination"], c["mirror_id"]) for c in data["copies"]}
    assert copies == {("analyzer1", env.mids[POLICY, 2]), ("ext", env.port_mid)}
    assert any("Reverse-orientation fallback" in n for n in data["notes"])

    table = _invoke("explain", "--source", env.source_dir, "--node", "node1", "--src", CLIENT,
                    "--dst", WEB, "--protocol", "icmp").stdout
    assert f"policy {POLICY}: rule 2 matches; rule 2 decides: mirror to analyzer1" in table
    assert "port mirror egress" in table and "interface demo/web/eth0 (ingress" in table


def test_explain_tcp_and_reverse_fallback(env):
    # A SYN to port 80: rule 0 decides. To port 81: nothing on web, the port mirror only.
    data = _explain(env, "--pod", "demo/client", "--dst", WEB, "--protocol", "tcp",
                    "--dport", "80")
    [pol] = next(i for i in data["interfaces"] if i["interface"] == "demo/web/eth0")["policies"]
    assert pol["deciding_rule"] == 0 and pol["mirror_id"] == env.mids[POLICY, 0]
    assert any("SYN" in n for n in data["notes"])
    data = _explain(env, "--pod", "demo/client", "--dst", WEB, "--protocol", "tcp",
                    "--dport", "81")
    [pol] = next(i for i in data["interfaces"] if i["interface"] == "demo/web/eth0")["policies"]
    assert not pol["matched"]
    assert [c["destination"] for c in data["copies"]] == ["ext"]

    # The UDP reply web:5353 -> client met mid-flow: matches only reversed.
    data = _explain(env, "--pod", "demo/client", "--dst", "demo/web", "--protocol", "udp",
                    "--sport", str(UDP_DPORT), "--dport", str(UDP_SPORT),
                    "--direction", "ingress", "--established")
    assert data["flow"]["src_ip"] == WEB and data["flow"]["src_port"] == UDP_DPORT
    [pol] = next(i for i in data["interfaces"] if i["interface"] == "demo/web/eth0")["policies"]
    assert pol["orientation"] == "reverse" and pol["deciding_rule"] == 1
    assert any("only with the packet reversed" in n for n in data["notes"])


def test_explain_compares_with_the_datapath(env):
    data = _explain(env, "--pod", "demo/client", "--dst", WEB, "--protocol", "udp",
                    "--sport", str(UDP_SPORT), "--dport", str(UDP_DPORT),
                    "--pin-root", env.pin_root, "--state-dir", env.state_dir)
    dp = data["datapath"]
    assert dp["found"] and dp["agrees"] is True
    [flow] = dp["flows"]
    assert flow["interface"] == "demo/web/eth0"
    assert flow["expected_mirror_ids"] == [env.mids[POLICY, 1]]
    # Not seen by the datapath: no entry, said so.
    data = _explain(env, "--pod", "demo/client", "--dst", WEB, "--protocol", "tcp",
                    "--dport", "443", "--pin-root", env.pin_root, "--state-dir", env.state_dir)
    assert data["datapath"]["found"] is False and data["datapath"]["agrees"] is None
    assert any("No flow entry" in n for n in data["datapath"]["notes"])
    table = _invoke("explain", "--source", env.source_dir, "--pod", "demo/client", "--dst",
                    "demo/web", "--protocol", "icmp", "--pin-root", env.pin_root,
                    "--state-dir", env.state_dir).stdout
    assert "datapath (" in table and ": agrees" in table


# ---------------------------------------------------------------------- completion
def _complete(words: str) -> list[str]:
    exe = Path(sys.executable).parent / "cn2mirror"
    parts = words.split(" ")
    env = {**os.environ, "_CN2MIRROR_COMPLETE": "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(len(parts) - 1)}
    r = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split(",", 1)[1] for line in r.stdout.splitlines() if "," in line]


def test_shell_completion():
    exe = Path(sys.executable).parent / "cn2mirror"
    r = subprocess.run([str(exe)], env={**os.environ, "_CN2MIRROR_COMPLETE": "bash_source"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "_cn2mirror_completion" in r.stdout
    assert "show" in _complete("cn2mirror sh")
    assert {"doctor", "explain", "ids", "show"} <= set(_complete("cn2mirror "))
    assert _complete("cn2mirror show fl") == ["flows"]
    assert set(_complete("cn2mirror show flows -o ")) == {"table", "json"}
    assert "--pin-root" in _complete("cn2mirror show stats --pi")
    assert set(_complete("cn2mirror explain --protocol ic")) == {"icmp", "icmpv6"}
    assert "--no-probe" in _complete("cn2mirror doctor --no")
