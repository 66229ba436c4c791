"""cn2mirror lab up/down and cn2mirror demo, through the CLI, on real namespaces."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cn2mirror.agent.compiler import compile_node
from cn2mirror.agent.lab import (
    DEFAULT_SPEC,
    EXAMPLES_SPEC,
    Lab,
    LabSpecError,
    lab_namespaces,
    validate_spec,
)
from cn2mirror.agent.model import CN2_UDP_PORT
from cn2mirror.agent.snapshot import load_paths
from cn2mirror.cli.lab_cmd import lab as lab_group
from cn2mirror.cli.lab_cmd import objects_path, record_path

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "manifests" / "examples"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cn2mirror.cli.main", *args]


def netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.fixture
def name():
    """A unique lab name; whatever a failed test leaves is removed."""
    n = "cn2t" + uuid.uuid4().hex[:8]
    yield n
    from cn2mirror.cli.lab_cmd import teardown

    teardown(n)
    assert not lab_namespaces(n)


def test_lab_up_then_down_from_another_process(name, tmp_path):
    objects = tmp_path / "objects.yaml"
    r = CliRunner().invoke(lab_group, ["up", "--name", name, "--objects-out", str(objects)])
    assert r.exit_code == 0, r.output
    expected = {f"{name}-{x}" for x in ("node1", "node2", "ext", "pod-web", "pod-client",
                                        "pod-analyzer", "pod-db", "pod-analyzer2")}
    assert set(lab_namespaces(name)) == expected
    assert f"{name}-pod-web" in netns_list()
    assert re.search(r"web\s+demo\s+node1\s+198\.18\.1\.2\s", r.output)
    assert f"--netns {name}-node1" in r.output and str(objects) in r.output
    record = json.load(open(record_path(name)))
    assert set(record["namespaces"]) == expected and record["objects"] == str(objects)

    # The objects match the examples: every policy example that fits the lab compiles to
    # rules on web, the named port "http" included, and the analyzer is found.
    snapshot, errors = load_paths([objects, EXAMPLES / "internal-analyzer.yaml",
                                   EXAMPLES / "policy-level-mirroring.yaml",
                                   EXAMPLES / "rule-level-mirroring.yaml",
                                   EXAMPLES / "external-analyzer.yaml"])
    assert not errors
    pods = {p["metadata"]["name"]: p for p in snapshot.pods}
    assert pods["web"]["status"]["podIP"] == "198.18.1.2"
    assert pods["web"]["spec"]["nodeName"] == "node1"
    state = compile_node(snapshot, "node1")
    assert not state.errors
    assert [i.key for i in state.interfaces] == ["demo/web/eth0"]
    http_only = next(p for p in state.policies if p.name == "demo/mirror-http-only")
    assert http_only.rules[0].ports[0].port_lo == 80  # named port http, via the lab
    assert state.destination("analyzer1").analyzer_pod == "demo/analyzer"

    # Down, from another process (it only has the record).
    r2 = subprocess.run(cli("lab", "down", "--name", name), capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr
    assert f"lab {name} removed (8 network namespaces)" in r2.stdout
    assert name not in netns_list()
    assert not os.path.exists(record_path(name)) and not objects.exists()
    r3 = CliRunner().invoke(lab_group, ["down", "--name", name])
    assert r3.exit_code == 0 and "nothing to remove" in r3.output


def test_lab_up_replaces_a_stale_lab(name):
    subprocess.run(["ip", "netns", "add", f"{name}-node1"], check=True)  # killed mid-build
    subprocess.run(["ip", "netns", "add", f"{name}-pod-old"], check=True)
    r = CliRunner().invoke(lab_group, ["up", "--name", name])
    assert r.exit_code == 0, r.output
    assert f"removed an earlier lab {name} (2 namespaces)" in r.output
    assert f"{name}-pod-old" not in lab_namespaces(name)
    assert os.path.exists(objects_path(name))
    r = CliRunner().invoke(lab_group, ["down", "--name", name])
    assert r.exit_code == 0 and not lab_namespaces(name)
    assert not os.path.exists(objects_path(name))


def test_lab_from_a_spec_file(name, tmp_path):
    spec = tmp_path / "lab.yaml"
    spec.write_text(yaml.safe_dump({
        "nodes": [{"name": "worker", "bridged": True}],
        "pods": [
            {"name": "a", "node": "worker", "labels": {"app": "a"},
             "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]},
            {"name": "b", "node": "worker", "host": 7, "namespace": "other"},
        ],
    }))
    objects = tmp_path / "o.yaml"
    r = CliRunner().invoke(lab_group, ["up", "--name", name, "--spec", str(spec),
                                       "--objects-out", str(objects)])
    assert r.exit_code == 0, r.output
    assert set(lab_namespaces(name)) == {f"{name}-worker", f"{name}-pod-a", f"{name}-pod-b"}
    addrs = subprocess.run(["ip", "-n", f"{name}-pod-b", "-j", "addr", "show", "eth0"],
                           capture_output=True, text=True, check=True).stdout
    assert "198.18.1.7" in addrs
    bridge = subprocess.run(["ip", "-n", f"{name}-worker", "-d", "link", "show", "va"],
                            capture_output=True, text=True, check=True).stdout
    assert "master cni0" in bridge  # bridged node: the pod's veth is a bridge port
    ping = subprocess.run(["ip", "netns", "exec", f"{name}-pod-a", "ping", "-c1", "-W2",
                           "198.18.1.7"], capture_output=True)
    assert ping.returncode == 0
    docs = list(yaml.safe_load_all(objects.read_text()))
    a = next(d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"] == "a")
    assert a["spec"]["containers"][0]["ports"] == [
        {"containerPort": 53, "protocol": "UDP", "name": "dns"}]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"} == \
        {"demo", "other"}
    # The record alone is enough to remove it.
    Lab.from_record(json.load(open(record_path(name)))).down()
    assert not lab_namespaces(name)


@pytest.mark.parametrize("spec, error", [
    ({"nodes": []}, "nodes: give one or two nodes"),
    ({"nodes": [{"name": "n1"}], "pods": [{"name": "p", "node": "n2"}]},
     "pods[0].node: 'n2' is not a node of the lab"),
    ({"nodes": [{"name": "n1"}], "pods": [{"name": "p", "node": "n1", "host": 1}]},
     "pods[0].host: must be a number from 2 to 254"),
    ({"nodes": [{"name": "n1"}], "pods": [{"name": "p", "node": "n1"},
                                          {"name": "p", "node": "n1"}]},
     "pods[1].name: pod 'p' given twice"),
    ({"nodes": [{"name": "n1", "colour": "red"}]}, "nodes[0]: unknown key 'colour'"),
    ({"nodes": [{"name": "n1"}], "pods": [{"name": "p", "node": "n1",
                                          "labels": {"on": True}}]},
     "pods[0].labels: must map strings to strings"),
    ({"nodes": [{"name": "n1"}], "external": "n9"}, "external: 'n9' is not a node"),
])
def test_bad_specs_are_refused_before_anything_is_built(name, tmp_path, spec, error):
    with pytest.raises(LabSpecError, match=re.escape(error)):
        validate_spec(spec)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = CliRunner().invoke(lab_group, ["up", "--name", name, "--spec", str(path)])
    assert r.exit_code == 1 and error in r.output
    assert not lab_namespaces(name) and not os.path.exists(record_path(name))


def test_default_spec_is_up_default():
    spec = validate_spec(DEFAULT_SPEC)
    assert [p["name"] for p in spec["pods"]] == ["web", "client", "analyzer", "db",
                                                 "analyzer2"]
    assert validate_spec(EXAMPLES_SPEC)["pods"][0]["ports"][0]["name"] == "http"
    r = CliRunner().invoke(lab_group, ["up", "--name", "Bad-Name"])
    assert r.exit_code == 2 and "lab name" in r.output


# ---------------------------------------------------------------------------- the demo


def demo_args(name: str, out: Path, pin_root: str) -> list[str]:
    return cli("demo", "--name", name, "--output-dir", str(out), "--pin-root", pin_root)


@pytest.mark.bpf
def test_demo_end_to_end(name, tmp_path, pin_root):
    # What a demo killed with SIGKILL leaves behind: its lab and its pins.
    Lab.from_spec({"nodes": [{"name": "node1"}]}, prefix=name)
    os.makedirs(pin_root)

    out = tmp_path / "demo-output"
    r = subprocess.run(demo_args(name, out, pin_root), capture_output=True, text=True,
                       timeout=120)
    text = r.stdout
    assert r.returncode == 0, text + r.stderr
    assert f"removed an earlier lab {name} (1 namespaces)" in text
    # The ids in the table are the compiler's, from the manifests the demo used.
    snapshot, errors = load_paths([out / "manifests"])
    assert not errors
    state = compile_node(snapshot, "node1")
    mid = {(p.name, r.index): r.mirror_id for p in state.policies for r in p.rules}
    sid = state.interface("demo/web/eth0").session_id
    rows = [line.split() for line in text.splitlines()
            if re.match(r"\s+(analyzer1|external-analyzer)\s+\d+\s", line)]
    counts = {(row[0], int(row[1]), f"{row[2]} {row[3]} {row[4]}", int(row[5]), row[6],
               " ".join(row[7:-1])): int(row[-1]) for row in rows}
    got = set(counts)
    web, client = "198.18.1.2", "198.18.1.3"
    icmp = {("external-analyzer", mid["demo/mirror-http-only", 2],
             "demo/mirror-http-only rule 2", sid, "demo/web/eth0", flow)
            for flow in (f"ICMP {client} -> {web} echo request",
                         f"ICMP {web} -> {client} echo reply")}
    assert icmp <= got and all(counts[g] == 3 for g in icmp)
    for policy in ("demo/mirror-web", "demo/mirror-http-only"):
        http = {g for g in got if g[2] == f"{policy} rule 0"}
        assert {g[1] for g in http} == {mid[policy, 0]}
        assert {g[0] for g in http} == {"analyzer1"} and {g[3] for g in http} == {sid}
        assert any(re.fullmatch(rf"TCP {client}:\d+ -> {web}:80", g[5]) for g in http)
        assert any(re.fullmatch(rf"TCP {web}:80 -> {client}:\d+", g[5]) for g in http)
    udp = {g for g in got if g[2] == "demo/mirror-web rule 1"}
    assert {g[1] for g in udp} == {mid["demo/mirror-web", 1]} and len(udp) == 2
    assert all(counts[g] == 10 for g in udp)  # ten datagrams, ten echoes
    # Exactly those rows: nothing of port 8080, db or IPv6 arrived.
    assert len(got) == 8 and not [g for g in got if "8080" in g[5] or "198.18.2.2" in g[5]]
    assert "TCP client -> web:8080       NOT mirrored: demo/mirror-http-only rule 1 " \
           "matches first and does not mirror; demo/mirror-web: no rule matches" in text
    assert "ping client -> db (node2)    NOT mirrored: no mirroring policy on node1" in text
    assert "ping6 client -> web          NOT mirrored: demo/mirror-http-only: no rule " \
           "matches; demo/mirror-web: no rule matches" in text
    assert "OK: every flow a rule mirrors arrived" in text
    # The demo's packets fit every path: nothing cut, nothing fragmented, and it says so.
    sent = re.search(r"Copies sent: (\d+); cut to fit the path: (\d+); sent whole in "
                     r"IPv4 fragments: (\d+)", text)
    assert sent and int(sent[1]) > 0 and sent[2] == "0" and sent[3] == "0", text
    assert "analyzerIP 198.19.0.10 -> 198.19.1.10" in text or \
        "analyzerIP" not in (EXAMPLES / "external-analyzer.yaml").read_text()
    assert f"Lab {name} removed (8 network namespaces), datapath removed." in text

    # The pcaps: the wire capture decodes as jmirror with the same ids, on CN2's port
    # (the example is in CN2's group, without udpPort).
    (ext,) = [d for d in state.destinations if d.name == "external-analyzer"]
    assert ext.udp_port == CN2_UDP_PORT
    wire = subprocess.run(["tshark", "-r", str(out / "external-analyzer-wire.pcap"), "-d",
                           f"udp.port=={CN2_UDP_PORT},jmirror", "-T", "fields", "-e", "jmirror.mid",
                           "-e", "jmirror.sid", "-e", "icmp.type"],
                          capture_output=True, text=True, check=True).stdout.split("\n")
    fields = [line.split("\t") for line in wire if line]
    assert len(fields) == 6  # three requests, three replies
    want = (mid["demo/mirror-http-only", 2], sid)
    assert {(int(m, 0), int(s, 0)) for m, s, _ in fields} == {want}
    assert sorted(t for _, _, t in fields) == ["0", "0", "0", "8", "8", "8"]
    decoded = subprocess.run(["tshark", "-r", str(out / "analyzer1.pcapng"), "-T", "fields",
                              "-e", "frame.interface_name", "-e", "udp.srcport"],
                             capture_output=True, text=True, check=True).stdout
    assert f"mid={mid['demo/mirror-web', 1]} sid={sid}" in decoded
    assert json.load(open(out / "agent" / "names.json"))["node"] == "node1"

    # Everything is gone.
    assert not lab_namespaces(name) and name not in netns_list()
    assert not os.path.exists(pin_root) and not os.path.exists(record_path(name))


@pytest.mark.bpf
@pytest.mark.parametrize("step", ["[2/4]", "[3/4]"])  # the agent starting; traffic flowing
def test_demo_interrupted_cleans_up(name, tmp_path, pin_root, step):
    proc = subprocess.Popen(demo_args(name, tmp_path / "out", pin_root),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(step):
                time.sleep(0.5)
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(seen) + rest
    assert proc.returncode == 1, output
    assert "interrupted: cleaning up" in output and f"Lab {name} removed" in output
    assert not lab_namespaces(name) and not os.path.exists(record_path(name))
    assert not os.path.exists(pin_root)
    # No tcpdump (or anything else) of the demo is left running.
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout == b""

