"""One agent per node: a second agent on the same pin root is refused, naming the owner;
a source that does not exist is refused before anything is touched; uninstall waits for
the agent to stop; a killed agent's lock goes with it.

Agents run as the real CLI in subprocesses on a namespace lab; the first one mirrors a
UDP stream the whole time, and every check ends with its copies still arriving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from cn2mirror.agent.ownership import OWNER_FILE, PinRootLock, in_use
from tests.test_agent_e2e import (
    Analyzer,
    UdpStream,
    agent_args,
    classifiers_on,
    cli,
    log_of,
    start_agent,
    stream_objects,
)

pytestmark = [pytest.mark.netns, pytest.mark.bpf]


def test_a_second_agent_is_refused_and_the_first_keeps_mirroring(lab, pin_root, state_dir,
                                                                 tmp_path):
    client, web = lab.pods["client"], lab.pods["web"]
    node1 = lab.nodes["node1"].netns
    objects = stream_objects(tmp_path, lab)
    empty = tmp_path / "empty"
    empty.mkdir()
    other_state = tmp_path / "other-state"

    a1 = Analyzer(lab.pods["analyzer"].netns)
    stream = UdpStream(client.netns, web.netns, web.ip, 5000)
    first = start_agent(agent_args(lab, objects, pin_root, state_dir), state_dir)
    try:
        record = json.load(open(os.path.join(state_dir, OWNER_FILE)))
        assert record["pid"] == first.pid and record["node"] == "node1"
        assert record["netns"] == node1 and record["sources"] == [str(objects)]
        assert os.stat(os.path.join(state_dir, OWNER_FILE)).st_mode & 0o777 == 0o600

        # A second agent, with an empty (valid) source and its own state directory.
        second = subprocess.run(
            cli("agent", "--source", str(empty), "--node", "node1", "--netns", node1,
                "--pin-root", pin_root, "--state-dir", str(other_state), "--once"),
            capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"{pin_root} is in use by another cn2mirror agent (pid {first.pid}:" in \
            second.stderr
        assert "--node node1" in second.stderr and str(objects) in second.stderr

        # A source that does not exist: refused, whatever the lock.
        missing = subprocess.run(
            cli("agent", "--source", "/nonexistent", "--node", "node1", "--netns", node1,
                "--pin-root", f"{pin_root}-other", "--state-dir", str(other_state),
                "--once"), capture_output=True, text=True, timeout=60)
        assert missing.returncode == 1 and "/nonexistent" in missing.stderr
        assert "would apply an empty state" in missing.stderr
        assert not os.path.exists(f"{pin_root}-other")

        # Uninstall waits for the agent to stop.
        un = subprocess.run(cli("uninstall", "--netns", node1, "--pin-root", pin_root,
                                "--state-dir", state_dir), capture_output=True, text=True,
                            timeout=60)
        assert un.returncode == 1 and "stop it first" in un.stderr
        assert in_use(pin_root) is not None
        t_checked = time.monotonic()
        time.sleep(0.5)
        assert first.poll() is None, log_of(first)
        assert len(a1.between(t_checked)) >= 15  # the first agent's copies go on
        assert "classify" in classifiers_on(node1, "vweb")

        # kill -9: the kernel drops the lock with the process; a new agent takes over.
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert in_use(pin_root) is None
        lock = PinRootLock(pin_root).acquire()
        lock.release()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        stream.close()
        a1.close()
