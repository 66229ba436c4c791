"""cn2mirror: CN2-compatible traffic mirroring with eBPF.

The code lives in the top-level folders agent/ (control plane and BPF loader),
bpf/ (the C programs) and cli/ (the command line); packaging maps them to
cn2mirror.agent, cn2mirror.bpf and cn2mirror.cli.
"""

__version__ = "0.1.0"
