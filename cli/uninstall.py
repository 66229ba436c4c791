"""``cn2mirror uninstall``: remove cn2mirror from this node and check that nothing is left.

Run it after the agent has stopped (in a cluster: after the DaemonSet is deleted, by the
uninstall DaemonSet in manifests/uninstall/, or on the node itself). Exit status 0 only
when the node is clean; otherwise every leftover is named.
"""

from __future__ import annotations

import os

import click

from cn2mirror.agent.defaults import DEFAULT_PIN_ROOT, DEFAULT_STATE_DIR
from cn2mirror.cli.output import emit, output_option


def _table(data: dict) -> str:
    lines = []
    if data["detached"]:
        lines.append("detached from: " + ", ".join(data["detached"]))
    if data["devices"]:
        lines.append("removed devices: " + ", ".join(data["devices"]))
    if data["pins_removed"]:
        lines.append("removed the pins")
    if data["state_dir_removed"]:
        lines.append("removed the state directory")
    if not lines:
        lines.append("nothing of cn2mirror was installed here")
    lines += [f"LEFT: {why}" for why in data["left"]]
    lines.append("clean: nothing of cn2mirror is left on this node" if data["clean"]
                 else "NOT clean: see the lines above")
    return "\n".join(lines)


@click.command()
@click.option("--pin-root", metavar="DIR", default=DEFAULT_PIN_ROOT, show_default=True,
              envvar="CN2MIRROR_PIN_ROOT", type=click.Path(file_okay=False),
              help="The agent's --pin-root. Env: CN2MIRROR_PIN_ROOT.")
@click.option("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR, show_default=True,
              envvar="CN2MIRROR_STATE_DIR", type=click.Path(file_okay=False),
              help="The agent's --state-dir. Env: CN2MIRROR_STATE_DIR.")
@click.option("--netns", metavar="NAME",
              help="The network namespace the agent ran in (the agent's --netns).")
@output_option
def uninstall(pin_root, state_dir, netns, fmt):
    """Detach every classifier, remove the mirror port, the VXLAN device, the pins and the
    state directory, then verify that none of it is left. Stop the agent first."""
    from cn2mirror.agent.uninstall import AgentRunning
    from cn2mirror.agent.uninstall import uninstall as run_uninstall

    if os.geteuid() != 0:
        raise click.ClickException("cn2mirror uninstall must run as root (it detaches BPF "
                                   "programs and removes links and pins)")
    if netns and not os.path.exists(os.path.join("/var/run/netns", netns)):
        raise click.ClickException(f"unknown network namespace {netns!r}")
    try:
        report = run_uninstall(pin_root, state_dir, netns)
    except AgentRunning as e:
        raise click.ClickException(str(e)) from None
    emit(report.as_dict(), fmt, _table)
    if report.left:
        raise SystemExit(1)
