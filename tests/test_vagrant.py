"""The VM lab (vagrant/): everything about it that can be checked without starting a VM.

No VM starts here (no virtualization on the development and CI machines). Checked: the
Vagrantfile with `vagrant validate` (offline), every script with shellcheck, the lab's
manifests against the CRDs and Kubernetes' schemas, the files the scripts use, the lab's
scenario through the project's compiler on a simulated cluster, verify.sh's judging code
on jmirror captures that Debian's tshark decodes, and verify.sh as a whole against
stand-ins for ssh, kubectl, vagrant and the host's tshark.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import wrpcap

from cn2mirror.agent import jmirror, model

from .test_crds import api_server_errors  # the offline API server of the CRD tests

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "vagrant"
VAGRANTFILE = LAB / "Vagrantfile"
MANIFESTS = LAB / "manifests"
VERIFY = LAB / "verify.sh"


def _load(name: str):
    """A helper module of vagrant/lib, imported from its file."""
    spec = importlib.util.spec_from_file_location(f"lab_{name}", LAB / "lib" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


check_capture = _load("check_capture")
expected_ids = _load("expected_ids")
local_image = _load("local_image")

# --- The Vagrantfile ---------------------------------------------------------------------------

VAGRANTFILE_TEXT = VAGRANTFILE.read_text()
SETTINGS_TEXT, _, WIRING_TEXT = VAGRANTFILE_TEXT.partition('Vagrant.configure("2")')
CONSTANTS = re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", SETTINGS_TEXT, re.M)


def constant(name: str) -> str:
    """The string value of a constant at the top of the Vagrantfile."""
    m = re.search(rf'^{name}\s*=\s*"([^"]*)"', SETTINGS_TEXT, re.M)
    assert m, f"no string constant {name} in the Vagrantfile"
    return m.group(1)


NODE_NAMES = re.findall(r'\{\s*name:\s*"([^"]+)",\s*ip:\s*"([^"]+)"\s*\}', SETTINGS_TEXT)
CONTROL_PLANE_NAME = NODE_NAMES[0][0]
K8S_VERSION = re.match(r"v(\d+\.\d+)\.\d+\+k3s\d+$", constant("K3S_VERSION")).group(1) + ".0"


def _vagrant_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No network, no global state: a fresh Vagrant home and machine folder in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAGRANT_")}
    env.update(
        VAGRANT_HOME=str(tmp_path / "vagrant-home"),
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile"),
        VAGRANT_CHECKPOINT_DISABLE="1",  # no version check on the network
        VAGRANT_BOX_UPDATE_CHECK_DISABLE="1",
        VAGRANT_NO_COLOR="1",
        **extra,
    )
    return env


def _offline(cmd: list[str]) -> list[str]:
    """Run ``cmd`` in a network namespace of its own (no network at all) when we may."""
    unshare = shutil.which("unshare")
    if unshare and os.geteuid() == 0:
        return [unshare, "--net", *cmd]
    return cmd


def _fake_vboxmanage(tmp_path: Path) -> Path:
    """A VBoxManage that only tells its version: enough for Vagrant's VirtualBox provider to
    call itself usable and validate its settings. Nothing here starts a VM."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "VBoxManage"
    stub.write_text('#!/bin/sh\n[ "$1" = --version ] && echo 7.0.20r163906\nexit 0\n')
    stub.chmod(0o755)
    return bindir


def _validate(vagrantfile_dir: Path, tmp_path: Path, *args: str,
              **env: str) -> subprocess.CompletedProcess:
    vagrant = shutil.which("vagrant")
    assert vagrant, "vagrant is not installed: run scripts/setup.sh (Debian package vagrant)"
    return subprocess.run(_offline([vagrant, "validate", *args]), cwd=vagrantfile_dir,
                          env=_vagrant_env(tmp_path, **env), capture_output=True, text=True,
                          timeout=120)


def test_vagrant_validate_offline(tmp_path):
    """The whole file, provider blocks left out: needs no provider installed."""
    token = LAB / ".k3s-token"
    had_token = token.exists()
    r = _validate(LAB, tmp_path, "--ignore-provider")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Vagrantfile validated successfully" in r.stdout
    assert token.exists() == had_token, "only vagrant up and provision make a join token"


def test_vagrant_validate_virtualbox_provider_settings(tmp_path):
    """With the VirtualBox provider (a version-only VBoxManage stands in for VirtualBox),
    Vagrant also checks the settings of the virtualbox blocks. The libvirt blocks belong
    to a plugin that is not installed here, and Vagrant does not look at them."""
    path = f"{_fake_vboxmanage(tmp_path)}:{os.environ.get('PATH', '')}"
    r = _validate(LAB, tmp_path, PATH=path, VAGRANT_DEFAULT_PROVIDER="virtualbox")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Vagrantfile validated successfully" in r.stdout


def test_vagrant_validate_would_catch_a_bad_setting(tmp_path):
    """The check above has teeth: a misspelt VirtualBox setting fails validation."""
    lab = tmp_path / "repo" / "vagrant"
    shutil.copytree(LAB, lab, ignore=shutil.ignore_patterns(".vagrant", "out", ".k3s-token"))
    text = (lab / "Vagrantfile").read_text()
    assert "vb.memory = n[:memory]" in text
    (lab / "Vagrantfile").write_text(text.replace("vb.memory = n[:memory]",
                                                  "vb.memroy = n[:memory]"))
    path = f"{_fake_vboxmanage(tmp_path)}:{os.environ.get('PATH', '')}"
    r = _validate(lab, tmp_path, PATH=path, VAGRANT_DEFAULT_PROVIDER="virtualbox")
    assert r.returncode != 0
    assert "memroy" in r.stdout + r.stderr


def test_vagrant_validate_libvirt_provider_settings(tmp_path):
    """With the vagrant-libvirt plugin installed (it needs no libvirt daemon to validate),
    the libvirt blocks are checked too, and a misspelt setting there fails."""
    r = _validate(LAB, tmp_path, VAGRANT_DEFAULT_PROVIDER="libvirt")
    if "provider 'libvirt' could not be found" in r.stdout + r.stderr:
        pytest.skip("the vagrant-libvirt plugin is not installed (Debian: apt install "
                    "vagrant-libvirt); the VirtualBox and provider-less checks still ran")
    assert r.returncode == 0, r.stdout + r.stderr
    lab = tmp_path / "repo" / "vagrant"
    shutil.copytree(LAB, lab, ignore=shutil.ignore_patterns(".vagrant", "out", ".k3s-token"))
    text = (lab / "Vagrantfile").read_text()
    assert "lv.memory = n[:memory]" in text
    (lab / "Vagrantfile").write_text(text.replace("lv.memory = n[:memory]",
                                                  "lv.memroy = n[:memory]"))
    r = _validate(lab, tmp_path, VAGRANT_DEFAULT_PROVIDER="libvirt")
    assert r.returncode != 0 and "memroy" in r.stdout + r.stderr


def _ruby_code(text: str) -> str:
    """Ruby without its comments (whole-line ones and "  # ..." at the end of a line)."""
    return re.sub(r"(?m)(^\s*#.*$|\s+#\s.*$)", "", text)


@pytest.mark.parametrize("name", CONSTANTS)
def test_vagrantfile_constant_is_used(name):
    after_definition = _ruby_code(VAGRANTFILE_TEXT).split(f"\n{name} =", 1)[1].split("\n", 1)[1]
    assert re.search(rf"\b{name}\b", after_definition), \
        f"{name} is set at the top of the Vagrantfile and never used"


def test_vagrantfile_constants_cover_the_brief():
    for name in ("BOX", "K3S_VERSION", "POD_CIDR", "HOST_IP", "CONTROL_PLANE", "WORKERS",
                 "CONTROL_PLANE_CPUS", "CONTROL_PLANE_MEMORY", "WORKER_CPUS", "WORKER_MEMORY"):
        assert name in CONSTANTS
    assert re.fullmatch(r"v\d+\.\d+\.\d+\+k3s\d+", constant("K3S_VERSION")), "pin k3s exactly"
    assert [n for n, _ in NODE_NAMES] == ["cn2m-cp", "cn2m-w1", "cn2m-w2"]
    assert "provider :libvirt" in WIRING_TEXT and "provider :virtualbox" in WIRING_TEXT


# --- The scripts -------------------------------------------------------------------------------

SCRIPTS = sorted(p for p in LAB.rglob("*.sh") if ".vagrant" not in p.parts)
PROVISION = sorted((LAB / "provision").glob("*.sh"))


def test_every_script_is_shellcheck_clean():
    assert SCRIPTS, "no scripts found"
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: run scripts/setup.sh"
    r = subprocess.run([shellcheck, "--external-sources", *map(str, SCRIPTS)], cwd=LAB,
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(LAB)))
def test_script_is_strict_bash(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text


def test_verify_is_executable():
    assert os.access(VERIFY, os.X_OK)


def test_provisioners_exist_and_get_what_they_need():
    """Each script's required variables (${X:?}) are in the Vagrantfile's env, and every
    variable the Vagrantfile passes is read by some script."""
    paths = re.findall(r'path:\s*"([^"]+)"', WIRING_TEXT)
    role_paths = [p.replace("#{n[:role]}", role) for p in paths
                  for role in (("server", "agent") if "#{" in p else ("",))]
    for p in role_paths:
        assert (LAB / p).is_file(), p
    assert {p.name for p in PROVISION} == {Path(p).name for p in role_paths}
    given = set(re.findall(r'"([A-Z][A-Z0-9_]*)"\s*=>', WIRING_TEXT))
    required = {v for p in PROVISION for v in re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?\}",
                                                          p.read_text())}
    assert required <= given, f"not passed by the Vagrantfile: {required - given}"
    read = {v for v in given if any(v in p.read_text() for p in PROVISION)}
    assert read == given, f"passed and never read: {given - read}"
    # Not K3S_*: k3s' installer copies those into the service's environment.
    assert not [v for v in given if v.startswith("K3S_")]


def _repo_paths_used() -> set[str]:
    """Repository paths the provisioning scripts and verify.sh use, relative to the root."""
    # "$REPO/x", "${REPO}/x", or the synced folder itself, "/vagrant/x" (not "/home/vagrant/").
    in_repo = re.compile(r"(?:\$\{?REPO\}?|(?<![\w}/])/vagrant)/([\w./-]*[\w-])")
    used = set()
    for p in PROVISION:
        used |= set(in_repo.findall(p.read_text()))
    verify = VERIFY.read_text()
    used |= set(in_repo.findall(verify))
    # verify.sh runs on the host, from vagrant/: "$HERE/x" (out/ is its own output).
    used |= {f"vagrant/{m}" for m in re.findall(r"\$HERE/([\w./-]*[\w-])", verify)
             if m != "out"}
    return used


REPO_PATHS = sorted(_repo_paths_used())


def test_scripts_use_the_agreed_repository_files():
    for path in ("Dockerfile", "manifests/crds", "manifests/deploy",
                 "vagrant/lib/local_image.py", "vagrant/manifests/00-lab-workloads.yaml",
                 "vagrant/images/analyzer/Containerfile", "vagrant/lib/expected_ids.py",
                 "vagrant/lib/check_capture.py"):
        assert path in REPO_PATHS, path


@pytest.mark.parametrize("path", REPO_PATHS)
def test_file_used_by_the_scripts_exists(path):
    """Dockerfile and manifests/deploy come from the agent's packaging work: this fails
    until they are in the repository."""
    assert (ROOT / path).exists(), f"the lab's scripts use {path}, which is not in the repository"


def test_deploy_kustomization_exists():
    assert (ROOT / "manifests" / "deploy" / "kustomization.yaml").is_file(), \
        "deploy.sh runs kubectl kustomize manifests/deploy: kustomization.yaml is missing"


def _kustomize_resources(directory: Path) -> list[dict[str, Any]]:
    """The plain resources of a kustomization, recursively (no transformers applied)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    docs: list[dict[str, Any]] = []
    for entry in kust.get("resources", []):
        target = directory / entry
        if target.is_dir():
            docs += _kustomize_resources(target)
        elif target.is_file():
            docs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    return docs


def test_local_image_finds_the_agent_in_manifests_deploy():
    deploy = ROOT / "manifests" / "deploy"
    assert (deploy / "kustomization.yaml").is_file(), "manifests/deploy is not there yet"
    docs = _kustomize_resources(deploy)
    changed, _ = local_image.localize(docs, "cn2mirror:dev")
    assert changed, "no container of manifests/deploy runs an image named cn2mirror"
    daemonsets = [d for d in docs if d.get("kind") == "DaemonSet"]
    assert daemonsets, "manifests/deploy has no DaemonSet"
    ns = {(d.get("metadata") or {}).get("namespace") for d in daemonsets}
    ns |= {(yaml.safe_load((deploy / "kustomization.yaml").read_text()) or {}).get("namespace")}
    assert "cn2mirror-system" in ns


def test_deploy_renders_what_the_kustomization_needs():
    kust = yaml.safe_load((ROOT / "manifests" / "deploy" / "kustomization.yaml").read_text())
    deploy_sh = (LAB / "provision" / "deploy.sh").read_text()
    assert "kubectl kustomize" in deploy_sh and "lib/local_image.py" in deploy_sh
    if any(str(r).startswith("../") for r in kust.get("resources", [])):
        # Files outside the kustomization's folder: kustomize refuses them without this.
        assert "--load-restrictor LoadRestrictionsNone" in deploy_sh


def test_local_image_rewrites_only_the_agent():
    docs = [
        {"kind": "DaemonSet", "metadata": {"name": "a"}, "spec": {"template": {"spec": {
            "initContainers": [{"name": "i", "image": "ghcr.io/x/cn2mirror:v1"}],
            "containers": [{"name": "a", "image": "cn2mirror@sha256:00",
                            "imagePullPolicy": "Always"},
                           {"name": "s", "image": "busybox:1.36"}]}}}},
        {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}},
    ]
    changed, others = local_image.localize(docs, "cn2mirror:dev")
    assert len(changed) == 2 and others == ["busybox:1.36"]
    spec = docs[0]["spec"]["template"]["spec"]
    assert [c["image"] for c in spec["initContainers"] + spec["containers"]] == \
        ["cn2mirror:dev", "cn2mirror:dev", "busybox:1.36"]
    assert spec["containers"][0]["imagePullPolicy"] == "Never"
    assert "imagePullPolicy" not in spec["containers"][1]
    assert local_image.localize([docs[1]], "x")[0] == []


# --- The manifests -----------------------------------------------------------------------------


def lab_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.name}[{i}]", doc)
        for p in sorted(MANIFESTS.glob("*.yaml"))
        for i, doc in enumerate(yaml.safe_load_all(p.read_text()))
        if doc
    ]


DOCS = lab_documents()


@pytest.mark.parametrize("name, doc", DOCS, ids=[n for n, _ in DOCS])
def test_manifest_is_accepted(name, doc):
    if doc["kind"] in model.MIRROR_KINDS:
        assert api_server_errors(doc) == []
        model.parse_object(doc)
    else:
        # Kubernetes' own schema, of the version the lab runs, unknown fields refused.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] == "Pod":
            assert model.parse_pod(doc).problems == ()


def _pods() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in DOCS if d["kind"] == "Pod"}


def test_workloads_are_pinned_to_the_vagrantfile_nodes():
    names = {n for n, _ in NODE_NAMES}
    pods = _pods()
    assert set(pods) == {"web", "client", "bystander", "analyzer1", "analyzer2"}
    for name, pod in pods.items():
        assert pod["spec"]["nodeSelector"]["kubernetes.io/hostname"] in names, name
    assert pods["analyzer1"]["metadata"]["labels"]["core.juniper.net/analyzer-pod"] == "analyzer1"
    for a in ("analyzer1", "analyzer2"):
        c = pods[a]["spec"]["containers"][0]
        assert (c["image"], c["imagePullPolicy"]) == (constant("ANALYZER_IMAGE"), "Never")


def test_external_analyzer_is_the_host():
    md = next(d for _, d in DOCS if d["kind"] == "MirrorDestination"
              and d["spec"].get("externalAnalyzer"))
    assert md["spec"]["analyzerIP"] == constant("HOST_IP")
    assert md["spec"]["udpPort"] == 30030


def test_verify_names_the_vagrantfile_nodes():
    text = VERIFY.read_text()
    assert f"CP={CONTROL_PLANE_NAME}\n" in text
    assert f"NODES=({' '.join(n for n, _ in NODE_NAMES)})" in text


# --- The scenario, through the project's compiler ----------------------------------------------

POD_IPS = {"web": "10.42.1.5", "analyzer1": "10.42.1.6", "client": "10.42.2.5",
           "bystander": "10.42.2.6", "analyzer2": "10.42.0.6"}


def simulated_cluster() -> list[dict[str, Any]]:
    """The lab's objects as the API would return them once the pods run on their nodes,
    plus a CoreDNS pod, as in any k3s cluster."""
    objects = []
    for _, doc in DOCS:
        doc = json.loads(json.dumps(doc))
        if doc["kind"] == "Pod":
            name = doc["metadata"]["name"]
            doc["spec"]["nodeName"] = doc["spec"]["nodeSelector"]["kubernetes.io/hostname"]
            doc["status"] = {"phase": "Running", "podIP": POD_IPS[name],
                             "podIPs": [{"ip": POD_IPS[name]}]}
        objects.append(doc)
    objects.append({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "coredns-1", "namespace": "kube-system",
                                 "labels": {"k8s-app": "kube-dns"}},
                    "spec": {"nodeName": CONTROL_PLANE_NAME,
                             "containers": [{"name": "coredns", "image": "coredns"}]},
                    "status": {"phase": "Running", "podIPs": [{"ip": "10.42.0.2"}]}})
    return [{"apiVersion": "v1", "kind": "List", "items": objects}]


@pytest.fixture(scope="module")
def ids() -> dict[str, Any]:
    return expected_ids.expected_ids(simulated_cluster())


def test_the_lab_compiles_to_what_verify_expects(ids):
    assert ids["errors"] == []
    assert {x.mirror_key for x in check_capture.EXPECTATIONS} == set(ids["mirror"])
    assert set(ids["session"]) == {"lab/web/eth0", "lab/client/eth0"}
    assert len(set(ids["mirror"].values())) == 3
    dest = ids["destinations"]
    assert dest["lab-same-node"]["analyzer_ip"] == POD_IPS["analyzer1"]
    assert dest["lab-other-node"]["analyzer_ip"] == POD_IPS["analyzer2"]
    assert dest["lab-external"]["analyzer_ip"] == constant("HOST_IP")


def test_expected_ids_runs_from_the_repository_without_the_package(tmp_path):
    """On a VM nothing is installed: expected_ids.py imports the compiler from the tree."""
    objects = tmp_path / "cluster.json"
    objects.write_text(json.dumps(simulated_cluster()))
    # Hide the installed package, as on the VMs, so that the fallback import is what runs.
    runner = (
        "import importlib.abc, runpy, sys\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cn2mirror' and not any('cn2mirror-ids-' in p for p in sys.path):\n"
        "            raise ImportError('hidden')\n"
        "sys.meta_path.insert(0, Hide())\n"
        f"sys.argv = ['expected_ids.py', '--objects', {str(objects)!r}]\n"
        f"runpy.run_path({str(LAB / 'lib' / 'expected_ids.py')!r}, run_name='__main__')\n"
    )
    r = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == expected_ids.expected_ids(simulated_cluster())


# --- verify.sh's judging, on captures decoded by tshark ----------------------------------------

HOST_IP_VALUE = constant("HOST_IP")
NODE_IP = dict(NODE_NAMES)


def _tshark_fields_of_verify() -> list[str]:
    m = re.search(r"for field in ([^;]+); do", VERIFY.read_text())
    assert m, "verify.sh's tshark field list"
    return m.group(1).split()


def test_verify_asks_tshark_for_the_fields_the_checker_reads():
    assert _tshark_fields_of_verify() == check_capture.TSHARK_FIELDS


def _copy(mid: int, sid: int, outer_src: str, outer_dst: str, inner) -> Ether:
    return (Ether() / IP(src=outer_src, dst=outer_dst) / UDP(sport=30030, dport=30030)
            / Raw(jmirror.encode(mid, sid, bytes(inner))))


def _http(src: str, dst: str, reply: bool = False):
    return IP(src=src, dst=dst) / (TCP(sport=80, dport=40000, flags="SA") if reply
                                   else TCP(sport=40000, dport=80, flags="S"))


def _ping(src: str, dst: str, reply: bool = False):
    return IP(src=src, dst=dst) / ICMP(type=0 if reply else 8)


def _captures(ids, tmp_path: Path, extra: dict[str, list] | None = None) -> dict[str, Path]:
    """What the three analyzers should see, through tshark as verify.sh runs it."""
    web, client = POD_IPS["web"], POD_IPS["client"]
    mid = ids["mirror"]
    s_web, s_client = ids["session"]["lab/web/eth0"], ids["session"]["lab/client/eth0"]
    w1, w2 = NODE_IP["cn2m-w1"], NODE_IP["cn2m-w2"]
    packets = {
        "same-node": [_copy(mid["csp/lab/http-to-same-node/rule/0"], s_web, w1,
                            POD_IPS["analyzer1"], p)
                      for p in (_http(client, web), _http(web, client, True))] * 3,
        "other-node": [_copy(mid["csp/lab/ping-to-other-node/rule/0"], s_web, w1,
                             POD_IPS["analyzer2"], p)
                       for p in (_ping(client, web), _ping(web, client, True))] * 3,
        "external": [_copy(mid["csp/lab/http-to-external/rule/0"], s_client, w2,
                           HOST_IP_VALUE, p)
                     for p in (_http(client, web), _http(web, client, True))] * 3,
    }
    for name, more in (extra or {}).items():
        packets[name] += more
    tshark = shutil.which("tshark")
    assert tshark, "tshark is not installed: run scripts/setup.sh"
    args = ["-n", "-d", "udp.port==30030,jmirror", "-T", "fields", "-E", "separator=/t"]
    for f in _tshark_fields_of_verify():
        args += ["-e", f]
    out = {}
    for name, pkts in packets.items():
        pcap = tmp_path / f"{name}.pcap"
        wrpcap(str(pcap), pkts)
        r = subprocess.run([tshark, "-r", str(pcap), *args], capture_output=True, text=True,
                           check=True)
        out[name] = tmp_path / f"{name}.tsv"
        out[name].write_text(r.stdout)
    return out


def _judge(ids, captures: dict[str, Path], traffic=None):
    pods = check_capture.pod_index({"items": [
        {"metadata": {"name": n}, "spec": {"nodeName": d["spec"]["nodeSelector"][
            "kubernetes.io/hostname"]}, "status": {"podIP": POD_IPS[n]}}
        for n, d in _pods().items()]})
    copies = {n: check_capture.read_capture(str(p)) for n, p in captures.items()}
    traffic = traffic or {"client": (10, 10, 10), "bystander": (10, 10, 10)}
    return check_capture.check(ids, pods, copies, traffic)


def test_checker_passes_the_expected_copies(ids, tmp_path):
    table = _judge(ids, _captures(ids, tmp_path))
    assert table.failures == [], table.render()
    assert len(table.rows) >= 30


def _failed(table) -> set[tuple[str, str]]:
    return {(c, k) for c, k, _, _, _ in table.failures}


def test_checker_fails_on_a_bystander_copy(ids, tmp_path):
    stray = _copy(ids["mirror"]["csp/lab/http-to-same-node/rule/0"],
                  ids["session"]["lab/web/eth0"], NODE_IP["cn2m-w1"], POD_IPS["analyzer1"],
                  _http(POD_IPS["bystander"], POD_IPS["web"]))
    table = _judge(ids, _captures(ids, tmp_path, {"same-node": [stray]}))
    assert _failed(table) == {("same-node", "only the selected flow"),
                              ("same-node", "no bystander copies")}


def test_checker_fails_on_wrong_ids_protocol_and_garbage(ids, tmp_path):
    web, client = POD_IPS["web"], POD_IPS["client"]
    w2 = NODE_IP["cn2m-w2"]
    wrong_mid = _copy(12345, ids["session"]["lab/client/eth0"], w2, HOST_IP_VALUE,
                      _http(client, web))
    ping = _copy(ids["mirror"]["csp/lab/http-to-external/rule/0"],
                 ids["session"]["lab/client/eth0"], w2, HOST_IP_VALUE, _ping(client, web))
    garbage = (Ether() / IP(src=w2, dst=HOST_IP_VALUE) / UDP(sport=30030, dport=30030)
               / Raw(b"xy"))
    table = _judge(ids, _captures(ids, tmp_path, {"external": [wrong_mid, ping, garbage]}))
    assert _failed(table) == {("external", "mirror id"), ("external", "protocol"),
                              ("external", "all jmirror")}


def test_checker_fails_on_silence_and_on_no_traffic(ids, tmp_path):
    captures = _captures(ids, tmp_path)
    captures["other-node"].write_text("")
    table = _judge(ids, captures, {"client": (10, 10, 10), "bystander": (0, 0, 10)})
    failed = _failed(table)
    assert ("-", "traffic from bystander") in failed
    assert ("other-node", "copies received") in failed
    assert not any(c in ("same-node", "external") for c, _ in failed)


def test_checker_command_line(ids, tmp_path):
    captures = _captures(ids, tmp_path)
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    pods = {"items": [{"metadata": {"name": n}, "spec": {
        "nodeName": d["spec"]["nodeSelector"]["kubernetes.io/hostname"]},
        "status": {"podIPs": [{"ip": POD_IPS[n]}]}} for n, d in _pods().items()]}
    (tmp_path / "pods.json").write_text(json.dumps(pods))
    cmd = [sys.executable, str(LAB / "lib" / "check_capture.py"),
           "--ids", str(tmp_path / "ids.json"), "--pods", str(tmp_path / "pods.json"),
           *[a for n, p in captures.items() for a in ("--capture", f"{n}={p}")],
           "--traffic", "client=10/9/10", "--traffic", "bystander=10/10/10"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: all" in r.stdout
    captures["external"].write_text("")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 1
    assert "[external] copies received" in r.stderr


# --- verify.sh itself, against a stand-in cluster ----------------------------------------------

FAKE_SSH = r"""#!/usr/bin/env bash
# ssh -F CONFIG -o ... HOST -- "COMMAND": runs COMMAND's stand-in here.
while [ $# -gt 0 ] && [ "$1" != "--" ]; do shift; done
shift
eval "set -- $1"
[ "$1" = sudo ] && shift
case "$1" in
  k3s) shift 2; exec fake-kubectl "$@" ;;
  cat) echo "NODE_NAME=cn2m-cp"; echo "HOST_IP=$FAKE_HOST_IP" ;;
  python3)
    exec "$FAKE_PYTHON" "$FAKE_REPO/vagrant/lib/expected_ids.py" \
      --objects "$FAKE_DIR/cluster.json" ;;
  *) echo "fake ssh: unexpected command: $*" >&2; exit 99 ;;
esac
"""

FAKE_KUBECTL = r"""
import json, os, subprocess, sys, time
D = os.environ["FAKE_DIR"]
args = sys.argv[1:]
with open(os.path.join(D, "kubectl.log"), "a") as log:
    print(" ".join(args), file=log)
ns = None
if args[:1] == ["-n"]:
    ns, args = args[1], args[2:]

def show(name):
    sys.stdout.write(open(os.path.join(D, name)).read())

cmd = args[0]
if cmd in ("apply", "delete"):
    sys.stdin.read()
    sys.exit(0)
if cmd in ("wait", "rollout"):
    sys.exit(0)
if cmd == "get":
    if args[1] == "daemonsets":
        print("daemonset.apps/cn2mirror-agent")
    elif args[1] == "pods" and "--field-selector" in args:
        print("pod/agent-" + args[args.index("--field-selector") + 1].split("=")[1])
    elif args[1] == "pods" and ns == "lab":
        show("pods.json")
    elif args[1:3] == ["pod", "web"]:
        print(os.environ["FAKE_WEB_IP"], end="")
    else:
        print("(fake kubectl) " + " ".join(args))
    sys.exit(0)
if cmd == "exec":
    pod, rest = args[1], args[args.index("--") + 1:]
    if rest[0] == "tshark":
        print("Capturing on 'eth0'", file=sys.stderr, flush=True)
        time.sleep(1)
        show(pod + ".tsv")
        sys.exit(0)
    if rest[0] == "sh":  # the traffic loop, with stand-in wget and ping on PATH
        sys.exit(subprocess.run(rest).returncode)
    if rest[0] == "cn2mirror":
        ids = json.load(open(os.path.join(D, "ids.json")))
        mid = int(rest[rest.index("--mirror-id") + 1])
        sid = int(rest[rest.index("--session-id") + 1])
        if mid in ids["mirror"].values() and sid in ids["session"].values():
            print("{}")
            sys.exit(0)
        print("Error: mirror id %d not known (names)" % mid, file=sys.stderr)
        sys.exit(1)
print("fake kubectl: unexpected " + " ".join(sys.argv[1:]), file=sys.stderr)
sys.exit(98)
"""

FAKE_HOST_TSHARK = r"""#!/usr/bin/env bash
# The host's tshark: a permission probe (no -T), or the external analyzer's capture.
case " $* " in
  *" -T "*) echo "Capturing on 'vboxnet0'" >&2; sleep 1; cat "$FAKE_DIR/host.tsv" ;;
esac
"""


def _stand_in_cluster(tmp_path: Path, ids, captures: dict[str, Path]) -> dict[str, str]:
    """PATH and environment under which verify.sh talks to a stand-in of the lab."""
    fake, bindir = tmp_path / "fake", tmp_path / "bin"
    fake.mkdir()
    bindir.mkdir()
    (fake / "cluster.json").write_text(json.dumps(simulated_cluster()))
    (fake / "ids.json").write_text(json.dumps(ids))
    pods = {"items": [{"metadata": {"name": n}, "spec": {
        "nodeName": d["spec"]["nodeSelector"]["kubernetes.io/hostname"]},
        "status": {"podIP": POD_IPS[n], "podIPs": [{"ip": POD_IPS[n]}]}}
        for n, d in _pods().items()]}
    (fake / "pods.json").write_text(json.dumps(pods))
    for pod, name in (("analyzer1", "same-node"), ("analyzer2", "other-node"),
                      ("host", "external")):
        shutil.copy(captures[name], fake / f"{pod}.tsv")
    scripts = {
        "ssh": FAKE_SSH,
        "fake-kubectl": f"#!{sys.executable}\n{FAKE_KUBECTL}",
        "tshark": FAKE_HOST_TSHARK,
        "vagrant": '#!/bin/sh\n[ "$1" = ssh-config ] && printf "Host cn2m-cp\\n"\n',
        "ip": f"#!/bin/sh\necho '3: vboxnet0    inet {HOST_IP_VALUE}/24 brd 192.168.56.255'\n",
        "wget": "#!/bin/sh\nexit 0\n",
        "ping": "#!/bin/sh\nexit 0\n",
        "python3": f'#!/bin/sh\nexec {sys.executable} "$@"\n',
    }
    for name, text in scripts.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TSHARK", "OUT", "ROUNDS")}
    env.update(PATH=f"{bindir}:{os.environ.get('PATH', '')}", FAKE_DIR=str(fake),
               FAKE_REPO=str(ROOT), FAKE_PYTHON=sys.executable, FAKE_HOST_IP=HOST_IP_VALUE,
               FAKE_WEB_IP=POD_IPS["web"], OUT=str(tmp_path / "out"), ROUNDS="2",
               DURATION="60", SETTLE="0")
    return env


def test_verify_sh_passes_against_a_stand_in_cluster(ids, tmp_path):
    """verify.sh's own flow (ssh and kubectl quoting, the traffic loop, the captures, the
    agent cross-check, the table) with stand-ins for ssh, kubectl, vagrant and tshark."""
    env = _stand_in_cluster(tmp_path, ids, _captures(ids, tmp_path))
    r = subprocess.run(["bash", str(VERIFY)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: all" in r.stdout and "verify: PASS" in r.stdout
    assert "agent's own ids" in r.stdout and " FAIL" not in r.stdout
    log = (tmp_path / "fake" / "kubectl.log").read_text().splitlines()
    assert sum(line == "apply -f -" for line in log) == len(list(MANIFESTS.glob("*.yaml")))
    assert (tmp_path / "out" / "traffic-client.txt").read_text().strip() == "2/2/2"
    # The tshark in the analyzers got the filter as one argument, through ssh and kubectl.
    assert any("-f udp dst port 30030" in line for line in log if "tshark" in line)


def test_verify_sh_fails_on_a_bystander_copy(ids, tmp_path):
    stray = _copy(ids["mirror"]["csp/lab/ping-to-other-node/rule/0"],
                  ids["session"]["lab/web/eth0"], NODE_IP["cn2m-w1"], POD_IPS["analyzer2"],
                  _ping(POD_IPS["bystander"], POD_IPS["web"]))
    env = _stand_in_cluster(tmp_path, ids, _captures(ids, tmp_path, {"other-node": [stray]}))
    r = subprocess.run(["bash", str(VERIFY)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[other-node] no bystander copies" in r.stderr
    assert "verify: FAIL" in r.stderr
