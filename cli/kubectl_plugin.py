"""``kubectl cn2mirror``: the node CLI, run in the agent pod of the right node.

Installed as ``kubectl-cn2mirror`` on PATH, kubectl finds it as a plugin:

    kubectl cn2mirror show flows --pod demo/web      # on the node that runs demo/web
    kubectl cn2mirror --node node1 show stats       # plugin options before the command
    kubectl cn2mirror status                          # every node: ready, attached, drops

The pod's node comes from the API (``spec.nodeName``); the agent pod on that node from
the agent's labels in its namespace; the command runs there with ``kubectl exec``, so
whatever kubectl is configured with (kubeconfig, context, credentials) applies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import click

from cn2mirror.agent.defaults import DEFAULT_NAMESPACE

AGENT_LABELS = {"app.kubernetes.io/name": "cn2mirror", "app.kubernetes.io/component": "agent"}
AGENT_CONTAINER = "agent"


class PluginError(click.ClickException):
    pass


def _api(kubeconfig: str | None, context: str | None):
    from kubernetes import client

    from cn2mirror.agent.kube import api_client

    try:
        return client.CoreV1Api(api_client(kubeconfig, context))
    except Exception as e:  # no kubeconfig, bad context: say it as kubectl would
        raise PluginError(f"cannot reach the cluster: {e}") from None


def _ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True"
               for c in (pod.status.conditions or [])) if pod.status else False


def agent_pods(api, namespace: str) -> dict[str, object]:
    """node name -> the agent pod on it (a running one first, then the newest)."""
    pods = api.list_namespaced_pod(namespace).items
    out: dict[str, object] = {}
    for p in pods:
        labels = p.metadata.labels or {}
        if not all(labels.get(k) == v for k, v in AGENT_LABELS.items()):
            continue
        node = p.spec.node_name
        if not node or (p.metadata.deletion_timestamp is not None):
            continue
        best = out.get(node)
        rank = (p.status.phase == "Running", _ready(p), p.metadata.creation_timestamp or "")
        if best is None or rank > (best.status.phase == "Running", _ready(best),
                                   best.metadata.creation_timestamp or ""):
            out[node] = p
    return out


def node_of(api, pod_key: str) -> str:
    namespace, _, name = pod_key.partition("/")
    if not name:
        raise PluginError(f"--pod takes NAMESPACE/NAME, not {pod_key!r}")
    from kubernetes.client.exceptions import ApiException

    try:
        pod = api.read_namespaced_pod(name, namespace)
    except ApiException as e:
        if e.status == 404:
            raise PluginError(f"no pod {pod_key}") from None
        raise PluginError(f"cannot read pod {pod_key}: {e.reason}") from None
    if not pod.spec.node_name:
        raise PluginError(f"pod {pod_key} is not scheduled on a node yet")
    return pod.spec.node_name


def _kubectl(kubeconfig: str | None, context: str | None) -> list[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise PluginError("kubectl is not on PATH")
    argv = [kubectl]
    if kubeconfig:
        argv += ["--kubeconfig", kubeconfig]
    if context:
        argv += ["--context", context]
    return argv


def exec_in(kubectl: list[str], namespace: str, pod: str, args: list[str],
            capture: bool = False) -> subprocess.CompletedProcess:
    argv = [*kubectl, "exec", "-n", namespace, pod, "-c", AGENT_CONTAINER, "--",
            "cn2mirror", *args]
    return subprocess.run(argv, capture_output=capture, text=True)


def _pod_option(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--pod" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--pod="):
            return a.split("=", 1)[1]
    return None


def _summary(kubectl, namespace: str, node: str, pod) -> dict:
    row = {"node": node, "agent": pod.metadata.name, "ready": _ready(pod),
           "interfaces": None, "copies": None, "dropped": None, "error": None}
    if pod.status.phase != "Running":
        row["error"] = f"agent pod is {pod.status.phase}"
        return row
    for what in ("interfaces", "stats"):
        r = exec_in(kubectl, namespace, pod.metadata.name, ["show", what, "-o", "json"],
                    capture=True)
        if r.returncode:
            row["error"] = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["failed"]
            row["error"] = row["error"][0]
            return row
        data = json.loads(r.stdout)
        if what == "interfaces":
            row["interfaces"] = len(data["interfaces"])
        else:
            node_counters = data["stats"]["node"]["counters"]
            row["copies"] = node_counters["packets"]
            row["dropped"] = node_counters["dropped"]
    return row


@click.command(context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": False,
                                 "help_option_names": ["-h", "--help"]})
@click.option("--kubeconfig", envvar="KUBECONFIG", metavar="FILE",
              help="Kubeconfig (as kubectl's).")
@click.option("--context", metavar="NAME", help="Kubeconfig context (as kubectl's).")
@click.option("--agent-namespace", default=DEFAULT_NAMESPACE, show_default=True,
              metavar="NS", help="Where the agent DaemonSet runs.")
@click.option("--node", metavar="NAME", help="Run on this node's agent (default: the node "
              "of --pod NS/NAME in the command).")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table",
              help="For `status`: table or json.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def main(kubeconfig, context, agent_namespace, node, fmt, args):
    """Run `cn2mirror ARGS` in the agent pod of a node, or `status` of every node.

    \b
    Examples:
      kubectl cn2mirror show flows --pod demo/web --mirrored
      kubectl cn2mirror --node node1 show stats --watch
      kubectl cn2mirror status
    """
    args = list(args)
    if not args:
        raise click.UsageError("give a cn2mirror command (show, explain, doctor, ...) or "
                               "status")
    # One KUBECONFIG path for the client; kubectl reads the variable itself.
    if kubeconfig and os.pathsep in kubeconfig:
        kubeconfig = kubeconfig.split(os.pathsep)[0]
    api = _api(kubeconfig, context)
    kubectl = _kubectl(kubeconfig, context)
    agents = agent_pods(api, agent_namespace)
    if args == ["status"]:
        rows = [_summary(kubectl, agent_namespace, n, p) for n, p in sorted(agents.items())]
        if fmt == "json":
            click.echo(json.dumps({"nodes": rows}, indent=2))
        else:
            from cn2mirror.cli.output import render_table

            click.echo(render_table(
                ["NODE", "AGENT", "READY", "INTERFACES", "COPIES", "DROPPED", "PROBLEM"],
                [[r["node"], r["agent"], "yes" if r["ready"] else "NO",
                  "-" if r["interfaces"] is None else r["interfaces"],
                  "-" if r["copies"] is None else r["copies"],
                  "-" if r["dropped"] is None else r["dropped"], r["error"] or ""]
                 for r in rows]).rstrip("\n"))
        if not rows:
            raise PluginError(f"no cn2mirror agent pods in namespace {agent_namespace}")
        if any(not r["ready"] or r["error"] for r in rows):
            sys.exit(1)
        return
    if node is None:
        pod_key = _pod_option(args)
        if pod_key is None:
            raise click.UsageError("say which node: --node NAME, or a --pod NS/NAME in the "
                                   "command")
        node = node_of(api, pod_key)
    pod = agents.get(node)
    if pod is None:
        raise PluginError(f"no cn2mirror agent runs on node {node} (namespace "
                          f"{agent_namespace})")
    sys.exit(exec_in(kubectl, agent_namespace, pod.metadata.name, args).returncode)


if __name__ == "__main__":
    main()
