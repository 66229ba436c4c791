"""Compile and load the BPF programs in a process of their own, pin them, and exit.

    python -m cn2mirror.agent.loader --pin-root DIR [--netns NAME] < program.c

bcc (and the LLVM and clang it brings, some 140 MB resident) is needed only to compile.
The agent runs this as a short-lived subprocess (Datapath.load), with the C text of the
programs (datapath.bpf_source: the load-time defines and the entry files of bpf/, their
includes inlined) on stdin, and then works on what it left pinned, through
libbpf alone (agent/bpfsys.py), so the long-lived agent never loads bcc. What is left
under the pin root:

- every map of layout.map_specs() as <pin root>/<name>: created when absent, adopted
  (the same map, its contents kept) when a previous run pinned it (BPF_TABLE_PINNED);
- every program of datapath.PROGRAMS as <pin root>/prog_<name>, replacing the pins of a previous
  run (the agent then replaces the attached programs in place);
- eval_progs[0] = the new eval_continue: the program array is pinned, so the entry
  stays when this process exits;
- the rule walk's scratch map, pinned (layout.eval_scratch_pin) and adopted like the
  other maps, so that classifiers still attached from the previous run and the new
  eval_continue they now tail-call share it; pins of other layouts are removed;
- peer_progs[0] = the new classify_to_pod_peer (what pod-side stubs tail-call).

Exit status 0 and one JSON line on stdout ({"programs": [names]}) on success; otherwise
status 1 and one JSON line on stdout {"error": message}, message saying what failed and
how to fix it (Datapath.load raises it as a DatapathError, with the compiler's
diagnostics, which bcc writes to stderr).
"""

from __future__ import annotations

import argparse
import ctypes as C
import json
import os
import re
import sys

from .bpfsys import obj_pin
from .datapath import PROGRAMS, prog_pin
from .layout import EVAL_SCRATCH_MAP
from .netns import entered


class LoadError(RuntimeError):
    """What went wrong, said so that the user can fix it."""


# Warnings are errors (bcc's own helpers.h, prepended to every program, triggers none
# with clang 14 and bcc 0.26: no warning needs suppressing).
CFLAGS_WARNINGS = ["-Wall", "-Werror"]


def load(pin_root: str, source: str, netns: str | None = None) -> list[str]:
    """Compile ``source``, load and pin (see the module's documentation); returns the
    programs' names."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise LoadError(
            "bcc is not importable: install Debian's python3-bpfcc and run from a venv "
            "made with --system-site-packages (make setup does both)") from e
    if not os.path.exists(f"/lib/modules/{os.uname().release}/build"):
        raise LoadError(
            f"no kernel headers at /lib/modules/{os.uname().release}/build: run "
            "scripts/setup.sh (it installs or links them)")
    with entered(netns):
        try:
            bpf = BPF(text=source, cflags=CFLAGS_WARNINGS)
        except Exception as e:
            raise LoadError(f"compiling the BPF programs failed: {e}") from e
        try:
            progs = {name: bpf.load_func(name.encode(), getattr(BPF, kind))
                     for name, kind in PROGRAMS.items()}
        except Exception as e:
            raise LoadError(f"the kernel rejected a BPF program: {e}") from e
    bpf.get_table(b"eval_progs")[C.c_int(0)] = C.c_int(progs["eval_continue"].fd)
    # The pod-side attachments' stubs tail-call the newest pod-side classifier.
    bpf.get_table(b"peer_progs")[C.c_int(0)] = C.c_int(progs["classify_to_pod_peer"].fd)
    for name, fn in progs.items():
        obj_pin(fn.fd, prog_pin(pin_root, name))
    _unpin_old_scratch(pin_root, source)
    return list(progs)


def _unpin_old_scratch(pin_root: str, source: str) -> None:
    """Scratch maps of programs with another layout (an upgrade): their programs keep
    them for as long as they run; the pin is not needed any more."""
    m = re.search(r'#define CN2M_SCRATCH_DIGEST "([^"]+)"', source)
    if not m:
        return
    current = f"{EVAL_SCRATCH_MAP}_{m.group(1)}"
    for name in os.listdir(pin_root):
        if name.startswith(EVAL_SCRATCH_MAP + "_") and name != current:
            os.unlink(os.path.join(pin_root, name))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cn2mirror.agent.loader",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pin-root", required=True)
    ap.add_argument("--netns", default=None)
    args = ap.parse_args(argv)
    source = sys.stdin.read()
    try:
        names = load(args.pin_root, source, args.netns)
    except LoadError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    except Exception as e:  # anything else: still one readable line for the agent
        print(json.dumps({"error": f"loading the BPF programs failed: "
                                   f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps({"programs": names}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
