"""The deployment manifests and the Dockerfile: valid, consistent, least privilege.

Built-in kinds are validated against the Kubernetes JSON schemas that the
kubernetes-validate package ships (offline: every socket connection fails during these
tests), for the oldest and newest versions it knows; the custom resources of
manifests/examples against their CRDs (tests/test_crds.py's offline API server). The
RBAC rules are checked against every request the agent's code makes to an emulated API
server.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from cn2mirror.agent.kube import KubeSource
from cn2mirror.agent.model import CN2_GROUP, GROUP, MIRROR_KINDS
from cn2mirror.agent.status import EventRecorder, LeaderElector, StatusWriter
from cn2mirror.cli.kube_options import kube_options

from .builders import md, namespace, wait_until
from .builders import mirror_policy as csp
from .kube_emulator import KubeEmulator, crd_files
from .test_crds import api_server_errors, example_documents
from .test_kube import ADMIN_TOOLS, ANALYZER, pod

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "manifests" / "deploy"
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


@pytest.fixture
def offline(monkeypatch):
    """Any network connection fails (Unix sockets still work)."""
    real = socket.socket.connect

    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return real(self, address)
        raise OSError(f"network access during an offline test: {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.name}[{i}]", doc))
    return out


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in documents() if d["kind"] == kind]


def daemonset() -> dict:
    (ds,) = by_kind("DaemonSet")
    return ds


# ---------------------------------------------------------------------------- validity


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name, doc", documents(), ids=[n for n, _ in documents()])
def test_builtin_kinds_validate_offline(offline, name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_offline_fixture_blocks_the_network(offline):
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 9))


@pytest.mark.parametrize("name, doc", [(n, d) for n, d in example_documents()
                                       if d["kind"] in MIRROR_KINDS],
                         ids=[n for n, d in example_documents() if d["kind"] in MIRROR_KINDS])
def test_example_custom_resources_fit_their_crds(offline, name, doc):
    assert api_server_errors(doc) == []


def kustomize(directory: Path) -> list[dict]:
    """What `kubectl kustomize` renders of a kustomization (a real kustomize run)."""
    r = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _identity(d: dict) -> tuple:
    return d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]


def test_kustomizations_render_and_validate(offline):
    """`kubectl kustomize manifests/deploy` renders every manifest of the folder (and only
    those), with the image set; the output validates against the Kubernetes schemas;
    `manifests/crds` renders this project's three CRDs on their own."""
    rendered = kustomize(DEPLOY)
    assert sorted(map(_identity, rendered)) == sorted(_identity(d) for _, d in documents())
    for doc in rendered:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    (ds,) = [d for d in rendered if d["kind"] == "DaemonSet"]
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    (image,) = k["images"]
    assert {c["image"] for c in ds["spec"]["template"]["spec"]["containers"]} == {
        f"{image['newName']}:{image['newTag']}"}
    assert not any(r.startswith("../") for r in k["resources"])  # renders without flags

    crds = kustomize(ROOT / "manifests" / "crds")
    assert sorted(str(ROOT / "manifests" / "crds" / f"{d['spec']['group']}_"
                      f"{d['spec']['names']['plural']}.yaml") for d in crds) == crd_files(GROUP)
    assert {d["kind"] for d in crds} == {"CustomResourceDefinition"}


def test_agent_objects_share_one_namespace():
    # The namespace, service account and priority class the others refer to exist.
    (ns,) = by_kind("Namespace")
    namespaced = [d for _, d in documents() if d["kind"] not in (
        "Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass")]
    assert {d["metadata"]["namespace"] for d in namespaced} == {ns["metadata"]["name"]}


# ---------------------------------------------------------------------------- DaemonSet


def test_daemonset_runs_everywhere_with_capabilities_not_privileged():
    ds = daemonset()
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec.get("hostPID") is not True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert {"operator": "Exists"} in spec["tolerations"]
    (pc,) = by_kind("PriorityClass")
    assert spec["priorityClassName"] == pc["metadata"]["name"] and pc["value"] >= 1e9
    (sa,) = by_kind("ServiceAccount")
    assert spec["serviceAccountName"] == sa["metadata"]["name"]

    (agent,) = spec["containers"]
    sc = agent["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # What tests/test_least_privilege.py runs the datapath with: no SYS_ADMIN.
    assert set(sc["capabilities"]["add"]) == {"BPF", "NET_ADMIN", "PERFMON"}
    from .test_least_privilege import CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, KEEP

    assert KEEP == {CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert agent["resources"]["requests"] and agent["resources"]["limits"]

    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert set(mounts) == {"/sys/fs/bpf/cn2mirror", "/lib/modules", "/usr/src",
                           "/sys/kernel/btf", "/run/cn2mirror", "/tmp", "/var/run/netns"}
    assert all(mounts[p].get("readOnly") for p in ("/lib/modules", "/usr/src",
                                                   "/sys/kernel/btf", "/var/run/netns"))
    # Namespaces the runtime makes after the agent started must show up in it.
    assert mounts["/var/run/netns"]["mountPropagation"] == "HostToContainer"
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in agent["volumeMounts"]:
        if m["mountPath"] == "/tmp":
            assert "emptyDir" in volumes[m["name"]]
            continue
        assert volumes[m["name"]]["hostPath"]["path"] == m["mountPath"]
    # Only the project's own directory of the host's bpffs: never a CNI's pins. The
    # init container (privileged: Bidirectional is for those only) mounts bpffs on the
    # host and makes that directory, root's only, before the agent starts.
    assert "mountPropagation" not in mounts["/sys/fs/bpf/cn2mirror"]
    assert volumes[mounts["/sys/fs/bpf/cn2mirror"]["name"]]["hostPath"]["type"] == \
        "Directory"
    args = agent["args"]
    assert "--pin-root=/sys/fs/bpf/cn2mirror" in args
    (init,) = spec["initContainers"]
    assert init["securityContext"]["privileged"] is True
    assert init["volumeMounts"] == [{"name": "bpffs", "mountPath": "/sys/fs/bpf",
                                     "mountPropagation": "Bidirectional"}]
    assert "mount -t bpf bpf /sys/fs/bpf" in init["command"][-1]
    assert "mkdir -p /sys/fs/bpf/cn2mirror && chmod 0700 /sys/fs/bpf/cn2mirror" in \
        init["command"][-1]


def test_probes_use_the_metrics_port_the_agent_serves():
    agent = daemonset()["spec"]["template"]["spec"]["containers"][0]
    (port,) = agent["ports"]
    args = agent["args"]
    address = next(a.split("=", 1)[1] for a in args if a.startswith("--metrics-address="))
    # On the node's address (hostNetwork: what the kubelet probes and Prometheus
    # scrapes), not on every address of the host.
    assert address == f"$(NODE_IP):{port['containerPort']}"
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        assert agent[probe]["httpGet"] == {"path": path, "port": port["name"]}
    annotations = daemonset()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])


def agent_options() -> set[str]:
    """Every option `cn2mirror agent` takes, once the Kubernetes options are in."""
    from cn2mirror.cli.agent_cmd import agent

    names = {o for p in agent.params for o in p.opts + p.secondary_opts}
    return names | {o for opt in kube_options() for o in _option_names(opt)}


def _option_names(decorator) -> set[str]:
    import click

    @click.command()
    def probe(**_):
        pass

    return {o for p in decorator(probe).params for o in p.opts + p.secondary_opts}


def test_daemonset_and_dockerfile_give_options_the_agent_knows():
    args = daemonset()["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "agent"
    known = agent_options()
    for a in args[1:]:
        assert a.split("=", 1)[0] in known, a
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1)
    for a in yaml.safe_load(cmd)[1:]:
        assert a.split("=", 1)[0] in known, a


def test_uninstall_daemonset_gives_options_uninstall_knows():
    from cn2mirror.cli.uninstall import uninstall

    known = {o for p in uninstall.params for o in p.opts}
    (ds,) = [d for d in yaml.safe_load_all(
        (ROOT / "manifests" / "uninstall" / "daemonset.yaml").read_text())]
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    assert init["args"][0] == "uninstall"
    for a in init["args"][1:]:
        assert a.split("=", 1)[0] in known, a
    # The same pin root and state directory as the agent's.
    agent_args = set(daemonset()["spec"]["template"]["spec"]["containers"][0]["args"])
    assert set(init["args"][1:]) <= agent_args


def test_dockerfile_is_debian_12_with_bcc_and_the_project():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("FROM debian:bookworm")
    assert "python3-bpfcc" in text and "--system-site-packages" in text
    copied = set()
    for line in lines:
        if line.startswith("COPY "):
            for src in shlex.split(line)[1:-1]:
                assert (ROOT / src).exists(), src
                copied.add(src)
    # pip install of the project reads its readme and package folders: all copied.
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {project["project"]["readme"], *project["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= copied, needed - copied
    assert re.search(r'^ENTRYPOINT \["cn2mirror"\]$', text, re.M)
    # Every Debian package named here exists in Debian 12 (as far as this machine knows
    # them: the packages the project's own setup installs are checked).
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for pkg in ("python3-bpfcc", "libbpfcc", "libbpf1", "iproute2", "ethtool"):
        assert pkg in setup and pkg in text


# ---------------------------------------------------------------------------- RBAC


def rules_of(kind: str) -> list[dict]:
    (role,) = by_kind(kind)
    return role["rules"]


def allowed(verb: str, group: str, resource: str, namespace: str | None, name: str | None,
            agent_ns: str) -> bool:
    for kind in ("ClusterRole", "Role"):
        if kind == "Role" and namespace != agent_ns:
            continue
        for r in rules_of(kind):
            if group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] \
                    and (not r.get("resourceNames") or name in r["resourceNames"]):
                return True
    return False


def test_rbac_has_no_wildcards_and_is_bound_to_the_agent():
    for kind in ("ClusterRole", "Role"):
        for r in rules_of(kind):
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in r[key], (kind, r)
            assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & \
                set(r["verbs"])
    (sa,) = by_kind("ServiceAccount")
    for kind, role in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        (binding,) = by_kind(kind)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role,
                                      "name": by_kind(role)[0]["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount",
                                        "name": sa["metadata"]["name"],
                                        "namespace": sa["metadata"]["namespace"]}]
    secrets = [r for k in ("ClusterRole", "Role") for r in rules_of(k)
               if "secrets" in r["resources"]]
    assert secrets == []


def _verb(method: str, path: str, query: dict) -> tuple[str, str, str, str | None, str | None]:
    """(verb, group, resource[/subresource], namespace, name) of one request."""
    parts = [p for p in path.split("/") if p]
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    namespace = None
    if rest[0] == "namespaces" and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    name = rest[1] if len(rest) > 1 else None
    if method == "GET":
        verb = "get" if name else "watch" if query.get("watch") == "true" else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
    return verb, group, resource, namespace, name


def test_rbac_covers_every_request_the_agent_makes():
    """A whole agent session (both groups' CRDs installed, statuses and Events written,
    the lease created and renewed) against the emulator; every request must be allowed
    by the ClusterRole or, in the agent's namespace, by the Role."""
    agent_ns = by_kind("Role")[0]["metadata"]["namespace"]
    lease_name = by_kind("Role")[0]["rules"][1]["resourceNames"][0]
    emu = KubeEmulator(bookmark_interval=0.2)
    emu.install_crd_files(crd_files(GROUP) + crd_files(CN2_GROUP))
    emu.start()
    api = client.ApiClient(emu.configuration())
    api.user_agent = "agent"
    src = KubeSource(api, debounce=0.01)
    elector = LeaderElector(api, agent_ns, lease_name, "node1", lease_duration=2,
                            renew_deadline=1, retry_period=0.2)
    events = EventRecorder(api, instance="node1", repeat_interval=0)
    writer = StatusWriter(api, src, elector, events, resync=0.2, min_interval=0.05)
    try:
        for o in (namespace("demo", **ADMIN_TOOLS), pod("a", "demo", "n", "198.18.1.2", ANALYZER),
                  md("analyzer1", "analyzer1"), md("nowhere", "nowhere"),
                  md("cn2", "analyzer1", api=f"{CN2_GROUP}/v4"),
                  csp("p", "demo", "web", "missing")):
            emu.apply(o)
        src.start(lambda s: None)
        writer.start()
        elector.start()
        wait_until(lambda: len(emu.items("events.k8s.io/v1", "Event")) == 2, 10)
        wait_until(lambda: len(emu.requests_matching("PATCH", "/events/")) >= 1, 5)
        wait_until(lambda: len(emu.requests_matching("PUT", "/leases/")) >= 1, 5)
        elector.stop(release=True)
    finally:
        writer.stop()
        elector.stop()
        src.stop()
        emu.stop()
    seen = set()
    for q in emu.requests:
        parts = q.path.strip("/").split("/")
        if len(parts) < {"api": 3, "apis": 4}[parts[0]]:
            continue  # discovery (/api, /api/v1, /apis, /apis/g/v): open to every client
        seen.add(_verb(q.method, q.path, q.query))
    denied = [s for s in seen if not allowed(*s, agent_ns)]
    assert denied == []
    verbs = {(v, g, r) for v, g, r, _, _ in seen}
    assert {("watch", "", "pods"), ("list", "", "namespaces"),
            ("patch", GROUP, "mirrordestinations/status"),
            ("patch", CN2_GROUP, "mirrordestinations/status"),
            ("patch", GROUP, "contrailsecuritypolicies/status"),
            ("create", "events.k8s.io", "events"), ("patch", "events.k8s.io", "events"),
            ("create", "coordination.k8s.io", "leases"),
            ("update", "coordination.k8s.io", "leases"),
            ("get", "coordination.k8s.io", "leases")} <= verbs
