"""`cn2mirror uninstall` in namespaces: after it, no packet is copied and nothing of ours
is left on the node (filters, devices, pins, state directory).

The agent runs with --once, which applies and exits leaving the datapath running: that is
exactly what deleting the DaemonSet leaves behind on a node.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.test_agent_e2e import (
    Analyzer,
    UdpStream,
    agent_args,
    classifiers_on,
    cli,
    link_exists,
    stream_objects,
)

pytestmark = [pytest.mark.netns, pytest.mark.bpf]


def test_uninstall_stops_every_copy_and_leaves_nothing(lab, pin_root, state_dir, tmp_path):
    client, web = lab.pods["client"], lab.pods["web"]
    node1 = lab.nodes["node1"].netns
    objects = stream_objects(tmp_path, lab)

    a1 = Analyzer(lab.pods["analyzer"].netns)
    stream = UdpStream(client.netns, web.netns, web.ip, 5000)
    try:
        once = subprocess.run(agent_args(lab, objects, pin_root, state_dir, "--once"),
                              capture_output=True, text=True, timeout=90)
        assert once.returncode == 0, once.stderr
        t_agent_gone = time.monotonic()
        time.sleep(0.5)
        # No agent runs, and the copies go on: what a deleted DaemonSet leaves behind.
        assert len(a1.between(t_agent_gone)) >= 15
        assert "classify" in classifiers_on(node1, "vweb")

        r = subprocess.run(cli("uninstall", "--netns", node1, "--pin-root", pin_root,
                               "--state-dir", state_dir, "-o", "json"),
                           capture_output=True, text=True, timeout=60)
        t_uninstalled = time.monotonic()
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)
        assert report["clean"] and report["left"] == []
        assert "vweb" in report["detached"]
        assert "cn2m-tx" in report["devices"]
        assert report["pins_removed"] and report["state_dir_removed"]
        time.sleep(0.6)
    finally:
        stream.close()
        a1.close()

    assert len([t for t, _ in stream.sent if t > t_uninstalled + 0.1]) >= 15  # still sending
    assert not a1.between(t_uninstalled + 0.1), "copies after uninstall"
    assert "classify" not in classifiers_on(node1, "vweb")
    assert not link_exists(node1, "cn2m-tx") and not link_exists(node1, "cn2m-rx")
    assert not os.path.exists(pin_root) and not os.path.exists(state_dir)

    # Again, on a clean node: nothing to do, and it says so.
    again = subprocess.run(cli("uninstall", "--netns", node1, "--pin-root", pin_root,
                               "--state-dir", state_dir), capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert "nothing of cn2mirror was installed here" in again.stdout
    assert "clean" in again.stdout


def test_uninstall_empties_directories_it_was_given_as_mounts(tmp_path):
    """In the uninstall DaemonSet the pin root and the state directory are hostPath
    mounts: they cannot be removed from inside the pod, so they are emptied, and an
    emptied mount point counts as clean."""
    from cn2mirror.agent.uninstall import uninstall

    netns = f"cn2m-un-{os.getpid()}"
    pins, state = tmp_path / "pins", tmp_path / "state"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    mounted = []
    try:
        for d in (pins, state):
            d.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d)], check=True)
            mounted.append(d)
        (pins / "links").mkdir()
        (pins / "links" / "vweb-ingress").write_text("x")
        (pins / "flows").write_text("x")
        (state / "names.json").write_text("{}")
        report = uninstall(str(pins), str(state), netns)
        assert report.pins and report.state_dir and report.left == []
        assert os.path.ismount(pins) and os.listdir(pins) == [] and os.listdir(state) == []
        # Nothing there any more: nothing to report as removed.
        again = uninstall(str(pins), str(state), netns)
        assert not again.pins and not again.state_dir and again.left == []
    finally:
        for d in mounted:
            subprocess.run(["umount", str(d)], check=False)
        subprocess.run(["ip", "netns", "del", netns], check=False)


def test_remove_pins_empties_a_mounted_pin_root_with_subdirectories(tmp_path):
    """The agent's --cleanup-on-exit (Datapath.remove_pins) on a pin root that is a mount
    point (a hostPath, or a bpffs of its own) with subdirectories: emptied, as uninstall
    does, instead of failing on the subdirectory or the mount point."""
    from cn2mirror.agent.datapath import Datapath

    pins = tmp_path / "pins"
    pins.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(pins)], check=True)
    try:
        (pins / "links").mkdir()
        (pins / "links" / "vweb-ingress").write_text("x")
        (pins / "flows").write_text("x")
        Datapath(str(pins)).remove_pins()
        assert os.path.ismount(pins) and os.listdir(pins) == []
    finally:
        subprocess.run(["umount", str(pins)], check=False)
    # Not a mount point: the whole tree goes.
    (tmp_path / "plain" / "sub").mkdir(parents=True)
    (tmp_path / "plain" / "sub" / "x").write_text("x")
    Datapath(str(tmp_path / "plain")).remove_pins()
    assert not (tmp_path / "plain").exists()
