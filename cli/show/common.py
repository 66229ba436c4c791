"""What ``show``, ``explain`` and ``ids`` share: their options, opening the pinned maps
with errors that say how to fix them, and the names and title over every output."""

from __future__ import annotations

import errno
import os

import click

from cn2mirror.agent import capabilities, protocols
from cn2mirror.agent.bpfsys import BpfError
from cn2mirror.agent.datapath import DEFAULT_PIN_ROOT
from cn2mirror.agent.node import DEFAULT_STATE_DIR
from cn2mirror.agent.pinned import NotPinned, PinnedMaps
from cn2mirror.agent.statefiles import NAMES_FILE, Names
from cn2mirror.cli.output import JSON_VERSION, note, output_option


def pin_root_option(f):
    return click.option(
        "--pin-root", metavar="DIR", default=DEFAULT_PIN_ROOT, show_default=True,
        # readable=False: a root-only pin root (0700) gets the "needs root" message
        # below, not a usage error
        envvar="CN2MIRROR_PIN_ROOT", type=click.Path(file_okay=False, readable=False),
        help="Where the agent pinned its maps (the agent's --pin-root). "
             "Env: CN2MIRROR_PIN_ROOT.")(f)


def state_dir_option(f):
    return click.option(
        "--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR, show_default=True,
        envvar="CN2MIRROR_STATE_DIR", type=click.Path(file_okay=False, readable=False),
        help=f"The agent's state directory; names come from <DIR>/{NAMES_FILE}. "
             "Env: CN2MIRROR_STATE_DIR.")(f)


def common_options(f):
    """--pin-root, --state-dir and -o: what every `show` command takes."""
    return pin_root_option(state_dir_option(output_option(f)))


NEED_ROOT = ("reading the pinned maps needs root (CAP_BPF or CAP_SYS_ADMIN): "
             "run it with sudo")


def _pinned_below(directory: str) -> list[str]:
    """Directories right under `directory` that hold a cn2mirror pin set."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names
            if os.path.exists(os.path.join(directory, n, "flows"))]


def open_maps(pin_root: str) -> PinnedMaps:
    """PinnedMaps, or a ClickException (exit 1) saying what is wrong and how to fix it."""
    try:
        pm = PinnedMaps(pin_root)
        pm.config()  # the first bpf() call: privilege problems show here
        return pm
    except NotPinned as e:
        if not capabilities.may_use_bpf():
            raise click.ClickException(NEED_ROOT) from e
        hint = ""
        found = _pinned_below(pin_root)
        if found:
            hint = f"; cn2mirror pins were found in {', '.join(found)}: use --pin-root " \
                   f"{found[0]}"
        elif pin_root.rstrip("/") != DEFAULT_PIN_ROOT:
            hint = f" (the default pin root is {DEFAULT_PIN_ROOT})"
        raise click.ClickException(f"{e}{hint}") from e
    except (BpfError, PermissionError) as e:
        denied = getattr(e, "errno", None) in (errno.EPERM, errno.EACCES)
        if denied or not capabilities.may_use_bpf():
            raise click.ClickException(NEED_ROOT) from e
        raise click.ClickException(f"cannot read the maps under {pin_root}: {e}") from e


class MapErrors:
    """Turns errors while reading maps (after opening them) into clear messages."""

    def __init__(self, pin_root: str):
        self.pin_root = pin_root

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, NotPinned):
            raise click.ClickException(
                f"{exc}: the pin set under {self.pin_root} is incomplete (an agent of "
                "another version, or one being removed)") from exc
        if isinstance(exc, BpfError):
            raise click.ClickException(f"reading the maps under {self.pin_root}: {exc}") \
                from exc
        return False


def names_notes(names: Names) -> None:
    """Table mode: tell a person when names are missing or do not fit the maps."""
    if not names.available:
        note(f"note: names unavailable ({names.reason}); showing numbers only")
    for obj, why in sorted(names.problems.items()):
        note(f"note: the agent could not apply {obj}: {why}")
    for m in names.mismatches:
        note(f"warning: names.json does not match the maps: {m} (the agent may have "
             "changed the datapath since it wrote the file)")


def header(pm: PinnedMaps, names: Names) -> dict:
    cfg = pm.config()
    return {"version": JSON_VERSION, "pin_root": pm.pin_root, "generation": cfg.generation,
            "mirror_ifindex": cfg.mirror_ifindex, "names": names.as_json()}


def title(data: dict) -> str:
    node = data["names"]["node"]
    where = f"node {node}, " if node else ""
    return f"{where}pin root {data['pin_root']}, generation {data['generation']}"


def parse_protocol(value: str) -> int:
    """--protocol: a name (tcp, udp, ...) or a number 0-255."""
    n = protocols.number(value)
    if n is None:
        raise click.BadParameter(
            f"{value!r}: use one of {', '.join(sorted(protocols.NUMBERS))} or a number 0-255",
            param_hint="--protocol")
    return n


def complete_protocol(ctx, param, incomplete):
    return [p for p in sorted(protocols.NUMBERS) if p.startswith(incomplete.lower())]
