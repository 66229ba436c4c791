"""`kubectl cn2mirror`: finds the node of a pod and the agent pod on it through the real
kubernetes client against the API emulation, and runs the node CLI there with
`kubectl exec`.

kubectl itself is replaced by a stand-in on PATH that behaves like `kubectl exec` in the
way that matters here: it receives the namespace, pod, container and command, answers
with what that pod's `cn2mirror` would print, and exits with its status. Each stand-in
"agent pod" answers from its own canned node state, and every call is logged, so the
test sees which pod a command really ran in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from .builders import write_kubeconfig
from .kube_emulator import KubeEmulator

PLUGIN = os.path.join(os.path.dirname(sys.executable), "kubectl-cn2mirror")

STAND_IN = textwrap.dedent('''\
    #!{python}
    """A stand-in for `kubectl exec -n NS POD -c agent -- cn2mirror ARGS`."""
    import json, sys
    argv = sys.argv[1:]
    with open({log!r}, "a") as f:
        f.write(json.dumps(argv) + "\\n")
    i = argv.index("exec")
    ns, pod, container = argv[i + 2], argv[i + 3], argv[i + 5]
    cmd = argv[argv.index("--") + 1:]
    assert cmd[0] == "cn2mirror" and container == "agent", argv
    nodes = {{"cn2mirror-a": (2, 100, 0), "cn2mirror-b": (1, 40, 7)}}
    if pod not in nodes:
        print(f'Error from server (NotFound): pods "{{pod}}" not found', file=sys.stderr)
        sys.exit(1)
    ifaces, copies, dropped = nodes[pod]
    if cmd[1:3] == ["show", "interfaces"]:
        print(json.dumps({{"interfaces": [{{}}] * ifaces}}))
    elif cmd[1:3] == ["show", "stats"]:
        print(json.dumps({{"stats": {{"node": {{"counters": {{"packets": copies,
                                                              "dropped": dropped}}}}}}}}))
    else:
        print(f"ran {{' '.join(cmd[1:])}} in {{pod}}")
        sys.exit(3 if "--fail" in cmd else 0)
    ''')


def agent(name: str, node: str, ready: bool = True) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "cn2mirror-system",
                         "labels": {"app.kubernetes.io/name": "cn2mirror",
                                    "app.kubernetes.io/component": "agent"}},
            "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "x"}]},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True" if ready else "False"}]}}


def workload(name: str, ns: str, node: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]},
            "status": {"phase": "Running"}}


@pytest.fixture
def cluster(tmp_path):
    emu = KubeEmulator()
    emu.start()
    for o in (agent("cn2mirror-a", "node1"), agent("cn2mirror-b", "node2", ready=False),
              workload("web", "demo", "node2"), workload("db", "demo", "node3")):
        emu.apply(o)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emu.url)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "kubectl.log"
    stand_in = bin_dir / "kubectl"
    stand_in.write_text(STAND_IN.format(python=sys.executable, log=str(log)))
    stand_in.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "KUBECONFIG": str(kubeconfig)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PLUGIN, *args], capture_output=True, text=True, env=env,
                              timeout=60)

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] \
            if log.exists() else []

    try:
        yield run, calls
    finally:
        emu.stop()


def test_runs_in_the_agent_pod_of_the_pods_node(cluster):
    run, calls = cluster
    r = run("show", "flows", "--pod", "demo/web", "--mirrored")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ran show flows --pod demo/web --mirrored in cn2mirror-b"
    (call,) = calls()
    assert call[call.index("exec"):] == ["exec", "-n", "cn2mirror-system", "cn2mirror-b",
                                         "-c",
                                         "agent", "--", "cn2mirror", "show", "flows", "--pod",
                                         "demo/web", "--mirrored"]
    assert "--kubeconfig" in call  # kubectl talks to the same cluster as the plugin


def test_node_option_and_exit_status(cluster):
    run, _ = cluster
    r = run("--node", "node1", "doctor", "--fail")
    assert r.returncode == 3 and "in cn2mirror-a" in r.stdout


def test_errors_name_what_is_missing(cluster):
    run, calls = cluster
    r = run("show", "flows", "--pod", "demo/db")  # node3 has no agent
    assert r.returncode == 1 and "no cn2mirror agent runs on node node3" in r.stderr
    r = run("show", "flows", "--pod", "demo/nothere")
    assert r.returncode == 1 and "no pod demo/nothere" in r.stderr
    r = run("show", "stats")
    assert r.returncode == 2 and "--node NAME, or a --pod" in r.stderr
    assert calls() == []


def test_status_of_every_node(cluster):
    run, _ = cluster
    r = run("-o", "json", "status")
    rows = {n["node"]: n for n in json.loads(r.stdout)["nodes"]}
    assert rows["node1"] == {"node": "node1", "agent": "cn2mirror-a", "ready": True,
                             "interfaces": 2, "copies": 100, "dropped": 0, "error": None}
    assert rows["node2"]["ready"] is False and rows["node2"]["dropped"] == 7
    assert r.returncode == 1  # an agent is not ready
    table = run("status").stdout
    assert "node2" in table and "NO" in table and "cn2mirror-a" in table
