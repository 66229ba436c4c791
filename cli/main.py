"""The `cn2mirror` command line. Subcommands live in their own modules and are imported
only when used, so `cn2mirror --help` is quick and needs neither root nor bcc."""

from __future__ import annotations

import importlib

import click

# name -> (module in cn2mirror.cli, attribute, one-line help)
COMMANDS = {
    "agent": ("agent_cmd", "agent", "Run the node agent (files or Kubernetes API)."),
    "capture": ("capture", "capture", "Receive jmirror copies at an analyzer; write pcapng."),
    "demo": ("lab_cmd", "demo", "Lab up, mirror, capture, show, lab down."),
    "doctor": ("doctor", "doctor", "Check kernel, tools and privileges the datapath needs."),
    "explain": ("show.explain", "explain",
                "Which policies and rules a flow matches; where copies go."),
    "ids": ("show.ids", "ids", "Map mirror and session ids back to policies, rules and pods."),
    "lab": ("lab_cmd", "lab", "Build or remove a lab of network namespaces."),
    "show": ("show.commands", "show", "Read the pinned maps: interfaces, rules, flows, counters."),
    "uninstall": ("uninstall", "uninstall", "Remove cn2mirror from this node; verify."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"cn2mirror.cli.{module}"), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cn2mirror")
def main():
    """cn2mirror: CN2-compatible flow and port mirroring for Kubernetes, with eBPF.

    Copies of selected traffic go to an analyzer wrapped in Juniper's jmirror header
    (or raw at L2, or in VXLAN). Start with `cn2mirror doctor`, then `make demo`.
    """


if __name__ == "__main__":
    main()
