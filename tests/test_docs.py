"""The README and docs/ point only at what exists: every relative link and every path of
this repository they name is there, nothing points outside the repository, and the
commands the README tells a new user to run are on PATH after set-up."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PATH = re.compile(r"`((?:agent|cli|bpf|manifests|charts|docs|benchmarks|tests|scripts|vagrant)"
                  r"/[A-Za-z0-9_./*-]*)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_and_paths_exist(doc):
    text = doc.read_text()
    assert "../shared" not in text  # the team's notes are not part of the repository
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
    for path in PATH.findall(text):
        path = path.rstrip(".")
        if "*" in path:
            assert list(ROOT.glob(path)), f"{doc.name} names {path}: nothing matches"
        else:
            assert (ROOT / path).exists(), f"{doc.name} names missing {path}"


def test_the_commands_the_readme_names_are_on_path():
    for command in ("cn2mirror",):
        found = shutil.which(command)
        assert found, f"{command} is not on PATH after set-up"
        r = subprocess.run([found, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "uninstall" in r.stdout
    plugin = Path(shutil.which("cn2mirror")).resolve().parent / "kubectl-cn2mirror"
    assert plugin.exists()
