#!/usr/bin/env python3
"""Point the agent's containers at the image built on the nodes.

Reads the rendered deployment (``kubectl kustomize manifests/deploy``) on stdin and writes
it to stdout with every container (and init container) whose image is named cn2mirror,
whatever its registry and tag, set to ``--image`` with ``imagePullPolicy: Never``: the
image is built on each node and never pulled. The same as an ``images:`` override plus a
pull-policy patch in a kustomize overlay, without having to know the base's image name.

Exits 2 when no container runs a cn2mirror image, naming the images it saw.
Needs only Python 3 and PyYAML (Debian: python3-yaml).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import yaml

IMAGE_NAME = "cn2mirror"


def image_name(image: str) -> str:
    """The last path component of an image reference, without tag or digest."""
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def pod_specs(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The pod specs inside a workload object (Pod, DaemonSet, Deployment, Job, CronJob...)."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return
    if obj.get("kind") == "Pod":
        yield spec
    template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
    if isinstance(template, dict) and isinstance(template.get("spec"), dict):
        yield template["spec"]


def localize(docs: list[Any], image: str) -> tuple[list[str], list[str]]:
    """Rewrite ``docs`` in place; (containers changed, other images seen)."""
    changed, others = [], []
    for obj in docs:
        if not isinstance(obj, dict):
            continue
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        for spec in pod_specs(obj):
            for key in ("initContainers", "containers"):
                for c in spec.get(key) or []:
                    if image_name(str(c.get("image", ""))) == IMAGE_NAME:
                        c["image"] = image
                        c["imagePullPolicy"] = "Never"
                        changed.append(f"{where} {key[:-1]} {c.get('name')}")
                    else:
                        others.append(str(c.get("image")))
    return changed, others


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="the local tag, e.g. cn2mirror:dev")
    args = parser.parse_args(argv)
    docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]
    changed, others = localize(docs, args.image)
    if not changed:
        print(f"local_image: no container runs a {IMAGE_NAME} image; images seen: "
              f"{', '.join(others) or 'none'}", file=sys.stderr)
        return 2
    for c in changed:
        print(f"local_image: {c} -> {args.image}, imagePullPolicy Never", file=sys.stderr)
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
