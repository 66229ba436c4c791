"""bpf/ as a C tree: the generated bpf/gen/layout.h is fresh (as the CRDs are), declares
every map of agent/layout.py and nothing declares a map anywhere else, and the unit the
loader compiles is the tree with its includes inlined."""

from __future__ import annotations

import ctypes as C
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cn2mirror.agent import datapath
from cn2mirror.agent import layout as L

ROOT = Path(__file__).resolve().parent.parent
BPF_DIR = ROOT / "bpf"
C_FILES = sorted([*BPF_DIR.glob("*.c"), *BPF_DIR.glob("lib/*.h")])


def test_the_committed_header_is_what_layout_py_generates():
    committed = (BPF_DIR / L.GENERATED_HEADER).read_text()
    assert committed == L.c_header(), \
        "bpf/gen/layout.h is stale: run `make gen` and commit it"


def test_the_check_entry_point_agrees(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cn2mirror.agent.layout", "--check"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_every_map_is_declared_in_the_generated_header_and_nowhere_else():
    header = (BPF_DIR / L.GENERATED_HEADER).read_text()
    declared = re.findall(r"^BPF_(?:F_)?TABLE(?:_PINNED)?\([^,]+,[^,]+,[^,]+, (\w+),",
                          header, re.M)
    assert declared == [s.name for s in L.map_specs()]
    for path in C_FILES:
        text = path.read_text()
        # bcc's map macros: BPF_TABLE, BPF_F_TABLE, BPF_HASH, BPF_ARRAY, BPF_PERCPU_*, ...
        assert not re.search(r"^\s*BPF_[A-Z_]+\(", text, re.M), \
            f"{path.relative_to(ROOT)} declares a map: declare it in agent/layout.py"


@pytest.mark.parametrize("cls", [L.FlowEntry, L.EvalScratch])
def test_the_size_assertions_of_flow_dests_sized_structs_hold_for_every_size(cls):
    for n in range(1, 33):
        t = L._with_flow_dests(cls, n)
        assert L.flow_dests_sized_size(cls, n) == C.sizeof(t), (cls.__name__, n)


def test_the_scratch_layout_is_declared_once_with_the_size_the_agent_expects():
    header = (BPF_DIR / L.GENERATED_HEADER).read_text()
    assert header.count("struct eval_scratch {") == 1
    for path in C_FILES:
        assert "struct eval_scratch {" not in path.read_text(), path
    spec = {s.name: s for s in L.map_specs(7)}["eval_scratch_map"]
    assert C.sizeof(spec.value) == L.flow_dests_sized_size(L.EvalScratch, 7)


def test_every_header_has_a_guard_and_every_include_exists():
    for path in C_FILES:
        text = path.read_text()
        if path.suffix == ".h":
            guard = re.search(r"^#ifndef (CN2M_\w+)\n#define \1$", text, re.M)
            assert guard, f"{path.relative_to(ROOT)}: no include guard"
        for inc in re.findall(r'^#include "([^"]+)"', text, re.M):
            assert (BPF_DIR / inc).is_file(), f"{path.relative_to(ROOT)}: {inc} missing"


def test_the_compiled_text_is_the_tree_with_each_file_inlined_once():
    text = datapath.bpf_source("/sys/fs/bpf/cn2m-unit", 5)
    assert '#define CN2M_PIN_ROOT "/sys/fs/bpf/cn2m-unit"' in text
    assert "#define MAX_FLOW_DESTS 5" in text
    assert not re.search(r'^\s*#include "', text, re.M)
    for path in C_FILES:
        rel = str(path.relative_to(BPF_DIR))
        assert text.count(f'#line 1 "{rel}"') == 1, rel
    assert text.count("#ifndef CN2M_GEN_LAYOUT_H") == 1
    # The digest names the scratch pin the loader keeps (agent/loader.py).
    assert f'#define CN2M_SCRATCH_DIGEST "{datapath.scratch_digest(5)}"' in text


def test_the_scratch_digest_reads_the_structs_of_the_generated_header():
    # Programs whose scratch layouts differ must never share a scratch pin.
    assert datapath.scratch_digest(4) == datapath.scratch_digest(4)
    assert datapath.scratch_digest(5) != datapath.scratch_digest(4)
    header = (BPF_DIR / L.GENERATED_HEADER).read_text()
    structs = re.findall(r"^struct (flow_key|parsed|eval_scratch) \{", header, re.M)
    assert structs == ["flow_key", "parsed", "eval_scratch"]


def test_a_missing_include_is_named(tmp_path):
    (tmp_path / "x.c").write_text('#include "lib/nothere.h"\n')
    with pytest.raises(datapath.DatapathError, match=r"x.c:1: #include \"lib/nothere.h\""):
        datapath.inline_includes((tmp_path / "x.c").read_text(), str(tmp_path), "x.c")


@pytest.mark.bpf
def test_every_header_compiles_on_its_own_with_warnings_as_errors(pin_root):
    """Each header includes what it uses: compiled alone (with bcc, as the loader
    compiles, -Wall -Werror), nothing is missing. Two compilers at a time, each in a
    process of its own (one per CPU here), once the first has pinned the maps."""
    from concurrent.futures import ThreadPoolExecutor

    os.makedirs(pin_root, exist_ok=True)
    defines = "".join(f"#define {k} {v}\n"
                      for k, v in datapath.load_time_defines(pin_root, 4).items())
    compile_alone = ("import sys\nfrom bcc import BPF\n"
                     "from cn2mirror.agent.loader import CFLAGS_WARNINGS\n"
                     "BPF(text=sys.stdin.read(), cflags=CFLAGS_WARNINGS).cleanup()\n")

    def compile_header(path: Path) -> tuple[str, subprocess.CompletedProcess]:
        rel = str(path.relative_to(BPF_DIR))
        text = datapath.inline_includes(f'{defines}#include "{rel}"\n', str(BPF_DIR))
        return rel, subprocess.run([sys.executable, "-c", compile_alone], input=text,
                                   capture_output=True, text=True, timeout=120)

    headers = sorted(BPF_DIR.glob("lib/*.h"))
    results = [compile_header(headers[0])]  # creates the pinned maps the others adopt
    with ThreadPoolExecutor(2) as pool:
        results += pool.map(compile_header, headers[1:])
    assert len(results) >= 10
    for rel, r in results:
        assert r.returncode == 0, f"{rel} does not compile on its own: {r.stderr[-2000:]}"


def test_map_sizes_are_set_at_load_time(monkeypatch):
    text = datapath.bpf_source("/sys/fs/bpf/cn2m-unit", 4, flow_table_size=64)
    assert "#define MAP_ENTRIES_FLOWS 64\n" in text
    monkeypatch.setattr(L, "LPM_ENTRIES", 256)  # what tests do for small tries
    text = datapath.bpf_source("/sys/fs/bpf/cn2m-unit", 4)
    assert "#define MAP_ENTRIES_DST_V4 256\n" in text
    assert f"#define MAP_ENTRIES_FLOWS {L.FLOW_TABLE_SIZE}\n" in text
