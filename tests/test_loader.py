"""Loading the programs in a subprocess (agent/loader.py) and adopting its pins.

The agent's own process never imports bcc: it runs ``python -m cn2mirror.agent.loader``,
which compiles, loads, fills the program array and pins everything, and then opens the
pins with libbpf. Compilation errors reach the user as a DatapathError with the
compiler's message; a second load on the same pin root replaces the programs and keeps
the maps and their contents (a restarted agent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cn2mirror.agent import datapath as dpmod
from cn2mirror.agent.bpfsys import BpfMap, obj_get, prog_id
from cn2mirror.agent.datapath import PROGRAMS, Datapath, DatapathError, prog_pin

pytestmark = [pytest.mark.bpf]


def eval_progs_entry(pin_root: str) -> int:
    """The id of the program in eval_progs[0] (a program array reads back ids)."""
    m = BpfMap.pinned(f"{pin_root}/eval_progs", 4, 4)
    try:
        return int.from_bytes(m.lookup(bytes(4)), "little")
    finally:
        os.close(m.fd)


def pinned_prog_id(pin_root: str, name: str) -> int:
    fd = obj_get(prog_pin(pin_root, name))
    try:
        return prog_id(fd)
    finally:
        os.close(fd)


def test_the_agent_loads_through_the_loader_without_bcc(pin_root):
    """In a fresh interpreter: load, then check that bcc was never imported or mapped."""
    code = f"""
import json, sys
from cn2mirror.agent.datapath import Datapath
dp = Datapath({pin_root!r})
dp.load()
mapped = any("libbcc" in line for line in open("/proc/self/maps"))
print(json.dumps({{"bcc": "bcc" in sys.modules or mapped, "maps": sorted(dp.maps),
                  "progs": sorted(dp.progs)}}))
dp.close()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["bcc"] is False
    assert out["progs"] == sorted(PROGRAMS)
    assert {"config", "flows", "rules", "src_v4", "stats_rule"} <= set(out["maps"])
    # The program array outlived the loader: it holds the pinned eval_continue.
    assert eval_progs_entry(pin_root) == pinned_prog_id(pin_root, "eval_continue")


def test_a_second_load_replaces_the_programs_and_keeps_the_maps(pin_root):
    dp = Datapath(pin_root)
    dp.load()
    try:
        before = {name: pinned_prog_id(pin_root, name) for name in PROGRAMS}
        dp.maps["sessions"].update((5).to_bytes(4, "little"), (1234).to_bytes(4, "little"))
    finally:
        dp.close()
    again = Datapath(pin_root)
    again.load()
    try:
        after = {name: pinned_prog_id(pin_root, name) for name in PROGRAMS}
        assert all(after[n] != before[n] for n in PROGRAMS)  # new programs...
        assert again.maps["sessions"].lookup((5).to_bytes(4, "little")) == \
            (1234).to_bytes(4, "little")  # ...on the same maps
        assert eval_progs_entry(pin_root) == after["eval_continue"]
        assert prog_id(again.prog_fd("classify_from_pod")) == after["classify_from_pod"]
    finally:
        again.close()


def test_a_compile_error_is_a_datapath_error_with_the_compilers_message(pin_root,
                                                                        monkeypatch):
    real = dpmod.bpf_source

    def broken(root, max_flow_dests):
        return real(root, max_flow_dests) + "\nint cn2m_broken(void) { return undeclared_x; }\n"

    monkeypatch.setattr(dpmod, "bpf_source", broken)
    dp = Datapath(pin_root)
    with pytest.raises(DatapathError) as e:
        dp.load()
    text = str(e.value)
    assert "compiling the BPF programs failed" in text
    assert "undeclared_x" in text  # clang's own diagnostic, from the loader's stderr
    assert dp.progs == {} and dp.maps == {}


def test_a_program_the_kernel_rejects_is_a_datapath_error(pin_root, monkeypatch):
    real = dpmod.bpf_source

    def rejected(root, max_flow_dests):
        # Reads past the end of a stack buffer: the verifier refuses it. (The real one
        # is renamed while bpf/ is included.)
        return "#define analyzer_port_rx analyzer_port_rx_orig\n" + \
            real(root, max_flow_dests) + """
#undef analyzer_port_rx
int analyzer_port_rx(struct xdp_md *ctx) {
    volatile char buf[8] = {};
    return buf[ctx->ingress_ifindex & 0xffff];
}
"""

    monkeypatch.setattr(dpmod, "bpf_source", rejected)
    with pytest.raises(DatapathError, match="the kernel rejected a BPF program"):
        Datapath(pin_root).load()
