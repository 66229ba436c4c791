#!/usr/bin/env python3
"""The jmirror ids the lab's copies must carry, computed from the cluster's objects.

Runs the project's own compiler (cn2mirror.agent.compiler, the code the agents run, from
the same synced tree their image was built from) over the live objects, for every node,
and prints JSON:

    {"mirror":  {"csp/lab/http-to-same-node/rule/0": 123456, ...},   # key -> mirror id
     "session": {"lab/web/eth0": 789, ...},                            # key -> session id
     "destinations": {"lab-same-node": {"analyzer_ip": "10.42.1.7", ...}, ...},
     "errors": [{"kind": "MirrorDestination", "name": "lab-x", "reason": "..."}]}

Mirror and session ids depend only on the set of keys in the whole cluster, so every node
agrees; "destinations" is what each MirrorDestination resolved to (the same on every node
for jmirror destinations).

Objects come from ``kubectl get ... -A -o json`` (``--kubectl``), or from files
(``--objects``, JSON or YAML, for tests). Needs Python 3.11 and PyYAML; imports the
project from the repository (this file's ../..) when it is not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESOURCES = [
    "pods",
    "namespaces",
    *(f"{plural}.{group}"
      for group in ("mirror.cn2mirror.io", "core.contrail.juniper.net")
      for plural in ("mirrordestinations", "contrailsecuritypolicies",
                     "globalcontrailsecuritypolicies")),
]


def _import_project():
    """cn2mirror.agent's compiler and snapshot modules, installed or from the repository."""
    try:
        from cn2mirror.agent import compiler, snapshot
    except ImportError:
        # The package maps the top-level agent/ folder to cn2mirror.agent (pyproject.toml):
        # rebuild that layout with a symlink, without installing anything.
        root = Path(tempfile.mkdtemp(prefix="cn2mirror-ids-"))
        (root / "cn2mirror").mkdir()
        (root / "cn2mirror" / "__init__.py").write_text("")
        (root / "cn2mirror" / "agent").symlink_to(REPO / "agent", target_is_directory=True)
        sys.path.insert(0, str(root))
        from cn2mirror.agent import compiler, snapshot
    return compiler, snapshot


def load_objects(kubectl: str | None, files: list[str]) -> list[Any]:
    objects: list[Any] = []
    if kubectl:
        cmd = [*shlex.split(kubectl), "get", ",".join(RESOURCES), "-A", "-o", "json"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        objects.append(json.loads(out))
    for name in files:
        import yaml

        for doc in yaml.safe_load_all(Path(name).read_text()):
            objects.extend(doc if isinstance(doc, list) else [doc] if doc else [])
    return objects


def expected_ids(objects: list[Any]) -> dict[str, Any]:
    compiler, snapshot = _import_project()
    snap, load_errors = snapshot.snapshot_from_objects(objects, "cluster")
    nodes = sorted({(p.get("spec") or {}).get("nodeName") for p in snap.pods} - {None})
    mirror: dict[str, int] = {}
    session: dict[str, int] = {}
    destinations: dict[str, dict[str, Any]] = {}
    errors = {("load", e.path, str(e)) for e in load_errors}
    for node in nodes:
        state = compiler.compile_node(snap, node)
        mirror.update({key: mid for mid, key in compiler.id_table(state).items()})
        session.update({key: sid for sid, key in compiler.session_table(state).items()})
        for d in state.destinations:
            destinations.setdefault(d.name, {k: (v.value if hasattr(v, "value") else v)
                                             for k, v in dataclasses.asdict(d).items()})
        errors.update((e.kind, e.name, e.reason) for e in state.errors)
    return {
        "mirror": dict(sorted(mirror.items())),
        "session": dict(sorted(session.items())),
        "destinations": dict(sorted(destinations.items())),
        "errors": [{"kind": k, "name": n, "reason": r} for k, n, r in sorted(errors)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubectl", default=None,
                        help='command that runs kubectl, e.g. "k3s kubectl" [default: none '
                             'with --objects, else kubectl]')
    parser.add_argument("--objects", action="append", default=[], metavar="FILE",
                        help="read objects from this JSON/YAML file (repeatable)")
    args = parser.parse_args(argv)
    kubectl = args.kubectl or (None if args.objects else "kubectl")
    json.dump(expected_ids(load_objects(kubectl, args.objects)), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
