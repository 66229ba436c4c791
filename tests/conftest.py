"""Fixtures shared by the tests that need namespaces, pins or a state directory.

- ``lab``: a Lab().up_default() (two nodes, pods, analyzers, an external analyzer), always
  torn down, also when the test fails;
- ``pin_root``: a fresh pin root under /sys/fs/bpf (cn2m-test-<random>), removed after;
- ``state_dir``: a fresh, empty agent state directory;
- ``emu``: the emulated API server (tests/kube_emulator.py) with this project's CRDs.

Object builders and helpers (wait_until, http_get, write_kubeconfig): tests/builders.py.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from cn2mirror.agent.lab import Lab
from cn2mirror.agent.model import GROUP

from .kube_emulator import KubeEmulator, crd_files


def pytest_configure(config):
    # bcc 0.26 warns, with the whole program text, that it was given str, not bytes.
    config.addinivalue_line("filterwarnings",
                            "ignore:not a bytes object:DeprecationWarning")


@pytest.fixture
def lab():
    the_lab = Lab()
    try:
        the_lab.up_default()
        yield the_lab
    finally:
        the_lab.down()


@pytest.fixture
def pin_root():
    if not os.path.ismount("/sys/fs/bpf"):
        from cn2mirror.agent.datapath import ensure_bpffs

        ensure_bpffs("/sys/fs/bpf")
    path = f"/sys/fs/bpf/cn2m-test-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        # bpffs: unlinking the pins is all there is to remove (no nested directories).
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / f"state-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    return str(path)


@pytest.fixture
def emu():
    e = KubeEmulator(bookmark_interval=0.2)
    e.install_crd_files(crd_files(GROUP))
    e.start()
    try:
        yield e
    finally:
        e.stop()
