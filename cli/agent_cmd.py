"""``cn2mirror agent``: the node agent. Reads cluster objects from a source, compiles them
for this node and keeps the datapath in step (agent/runtime.py).

Sources: ``--source PATH`` (YAML files or directories, polled for changes). The
Kubernetes API source adds its options (``--kubernetes``, ``--kubeconfig``) in
``SOURCE_OPTIONS`` and builds its source in ``make_source``; nothing else changes.

On SIGINT/SIGTERM the agent stops and leaves the datapath running: mirroring continues
with the last applied state, and a restarted agent adopts the pinned maps and the
attachments without a gap. ``--cleanup-on-exit`` removes everything instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import threading

import click

from cn2mirror.agent import defaults as D
from cn2mirror.agent import layout

from .kube_options import kube_options, kube_options_from_params

log = logging.getLogger("cn2mirror.agent")

ONCE_TIMEOUT = 120.0  # --once: longest wait for the source's first complete view


class AgentError(click.ClickException):
    """A problem the user must fix before the agent can run (exit code 1)."""

    exit_code = 1

    def format_message(self) -> str:
        return self.message


def check_environment(netns: str | None) -> None:
    """Root, bcc and the network namespace, checked before anything is touched."""
    if os.geteuid() != 0:
        raise AgentError("cn2mirror agent must run as root: it loads BPF programs, pins "
                         "maps and attaches to interfaces (try sudo)")
    # Found, not imported: only the loader subprocess (agent/loader.py) loads bcc.
    if importlib.util.find_spec("bcc") is None:
        raise AgentError("bcc is not importable: install Debian's python3-bpfcc and run "
                         "from a venv made with --system-site-packages (make setup does "
                         "both)")
    if netns and not os.path.exists(os.path.join("/var/run/netns", netns)):
        raise AgentError(f"unknown network namespace {netns!r} (see `ip netns list`)")


# The options that choose where objects come from. The Kubernetes source adds its own
# here (e.g. --kubernetes, --kubeconfig) and handles them in make_source().
SOURCE_OPTIONS = [
    click.option("--source", "sources", multiple=True, metavar="PATH",
                 type=click.Path(path_type=str),
                 help="YAML file or directory of objects (Pods, Namespaces, "
                      "MirrorDestinations, policies); repeatable. Polled for changes."),
    click.option("--poll-interval", type=click.FloatRange(min=0.05), metavar="SECONDS",
                 default=D.DEFAULT_POLL_INTERVAL, show_default=True,
                 help="How often --source files are checked for changes."),
    *kube_options(),
]


def make_source(sources: tuple[str, ...], poll_interval: float, kube=None, node_name=None,
                **_other):
    """The Source the options ask for: files, or the Kubernetes API."""
    if kube is not None:
        if sources:
            raise click.UsageError("--source and --kubernetes exclude each other")
        return kube.source(node_name)
    if not sources:
        raise click.UsageError("give at least one --source PATH (or --kubernetes)")
    from cn2mirror.agent.filesource import FileSource

    return FileSource(sources, poll_interval=poll_interval)


def _source_options(f):
    for option in reversed(SOURCE_OPTIONS):
        f = option(f)
    return f


@click.command("agent")
@_source_options
@click.option("--node", "node_name", envvar="NODE_NAME", metavar="NAME",
              help="This node's name, as pods' spec.nodeName has it [default: $NODE_NAME].")
@click.option("--netns", metavar="NAME",
              help="Work in this named network namespace (a lab node) instead of the "
                   "agent's own.")
@click.option("--pin-root", default=D.DEFAULT_PIN_ROOT, show_default=True, metavar="DIR",
              help="Where the BPF maps and programs are pinned (bpffs).")
@click.option("--state-dir", default=D.DEFAULT_STATE_DIR, show_default=True, metavar="DIR",
              help="Where names.json, capture-names.json and status.json are written.")
@click.option("--max-flow-dests", type=click.IntRange(1, 32),
              default=D.DEFAULT_MAX_FLOW_DESTS, show_default=True,
              help="Most copies of one flow (the vRouter allows 2).")
@click.option("--copy-budget-pps", type=click.IntRange(0, layout.BUDGET_PPS_MAX),
              default=layout.default_node_copy_budget()[0], show_default=True, metavar="N",
              help="The node's copy budget: most copies a second over all destinations "
                   "(a GSO super-packet counts as its segments); copies over it are not made "
                   "and are counted as rate_limited (0: no limit). Default: "
                   f"{layout.DEFAULT_NODE_COPY_PPS_PER_CPU:,} per CPU of the node.")
@click.option("--copy-budget-bps", type=click.IntRange(0, layout.BUDGET_BPS_MAX),
              default=layout.default_node_copy_budget()[1], show_default=True, metavar="N",
              help="The node's copy budget in bits a second of mirrored packets (0: no "
                   f"limit; else at least {layout.BUDGET_BPS_MIN}). Default: "
                   f"{layout.DEFAULT_NODE_COPY_BPS_PER_CPU // 1_000_000:,} Mbit/s per CPU.")
@click.option("--flow-sampling-seed", type=click.IntRange(0, layout.SAMPLE_SEED_MAX),
              default=0, envvar="CN2MIRROR_FLOW_SAMPLING_SEED", metavar="N",
              help="Seed of the hash that picks the 1 flow in N of destinations sampling "
                   "by flow: give every node the same secret number, so that each flow is "
                   "sampled alike at both ends and a pod's owner cannot choose ports that "
                   "are never sampled. 0: a fixed, public default. "
                   "[env: CN2MIRROR_FLOW_SAMPLING_SEED]")
@click.option("--uplink", metavar="IFNAME",
              help="The interface NIC-assisted (VLAN) copies leave on.")
@click.option("--resync-interval", type=click.FloatRange(min=0.1), metavar="SECONDS",
              default=D.DEFAULT_RESYNC_INTERVAL, show_default=True,
              help="Re-apply the state this often (picks up late routes, neighbours).")
@click.option("--attach-mode", type=click.Choice(["auto", "tcx", "legacy"]),
              default=D.DEFAULT_ATTACH_MODE,
              show_default=True,
              help="How the classifier is attached to pod interfaces: tcx links at the "
                   "head of the chain (Linux >= 6.6), legacy clsact filters, or auto (tcx "
                   "when the kernel has it; $CN2MIRROR_ATTACH_MODE overrides auto).")
@click.option("--pod-side-ingress", is_flag=True,
              help="Classify traffic to pods on the pod's own eth0 (a tcx link inside the "
                   "pod's network namespace) instead of the host-side veth's egress: for "
                   "CNIs that deliver it with bpf_redirect_peer (Cilium with BPF host "
                   "routing). Needs tcx, and the pods' namespaces under /var/run/netns.")
@click.option("--max-rules-per-namespace", type=click.IntRange(min=0), default=0,
              show_default=True, metavar="N",
              help="Most rule slots one namespace may take on this node: its policies' "
                   "rules and its pods' port mirrors (0: no limit); over it, its largest "
                   "policies or pods are left out and named.")
@click.option("--max-interfaces-per-namespace", type=click.IntRange(min=0), default=0,
              show_default=True, metavar="N",
              help="Most pod interfaces of one namespace this node attaches to (0: no "
                   "limit); over it, its pods with the most interfaces are left out.")
@click.option("--once", is_flag=True,
              help="Apply the current objects once and exit (the datapath keeps running).")
@click.option("--cleanup-on-exit", is_flag=True,
              help="On exit, detach and unpin everything (mirroring stops).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def agent(sources, poll_interval, node_name, netns, pin_root, state_dir, max_flow_dests,
          copy_budget_pps, copy_budget_bps, flow_sampling_seed, uplink, resync_interval,
          attach_mode,
          pod_side_ingress, max_rules_per_namespace, max_interfaces_per_namespace, once,
          cleanup_on_exit, log_level,
          **source_options):
    """Run the node agent: mirror what the policies select on this node.

    \b
    Example (a lab made with `cn2mirror lab up`):
      cn2mirror agent --node node1 --netns cn2lab-node1 \\
          --source manifests/examples/internal-analyzer.yaml \\
          --source /run/cn2mirror/labs/cn2lab-objects.yaml
    """
    logging.basicConfig(level=getattr(logging, log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not node_name:
        raise click.UsageError("give --node NAME or set NODE_NAME (the downward API's "
                               "spec.nodeName)")
    check_environment(netns)
    metrics_address = source_options.get("kube_metrics_address")  # any source serves it
    kube = kube_options_from_params(source_options)  # takes the kube_* options
    from cn2mirror.agent.filesource import SourceError
    from cn2mirror.agent.ownership import OwnedElsewhere, OwnerRecord, PinRootLock

    try:
        source = make_source(sources, poll_interval, kube=kube, node_name=node_name,
                             **source_options)
    except SourceError as e:
        raise AgentError(f"--source: {e}") from None
    # One agent per pin root (agent/ownership.py), held until this process ends.
    lock = PinRootLock(pin_root, state_dir)
    try:
        lock.acquire(OwnerRecord(node_name, netns,
                                 list(sources) if kube is None else ["kubernetes"]))
    except OwnedElsewhere as e:
        raise AgentError(str(e)) from None
    except OSError as e:
        raise AgentError(f"cannot lock the pin root {pin_root}: {e}") from None
    try:
        from cn2mirror.agent.capacity import Limits
        from cn2mirror.agent.programmer import CopyBudget

        if 0 < copy_budget_bps < layout.BUDGET_BPS_MIN:
            raise click.BadParameter(f"0 or at least {layout.BUDGET_BPS_MIN}",
                                     param_hint="--copy-budget-bps")
        node_options = {"max_flow_dests": max_flow_dests, "uplink": uplink,
                        "copy_budget": CopyBudget(copy_budget_pps, copy_budget_bps),
                        "flow_sampling_seed": flow_sampling_seed,
                        "attach_mode": attach_mode, "pod_side": pod_side_ingress,
                        "limits": Limits(max_rules_per_namespace=max_rules_per_namespace,
                                         max_interfaces_per_namespace=max_interfaces_per_namespace)}
        _run(source, kube, node_name, netns, pin_root, state_dir, node_options,
             resync_interval, once, cleanup_on_exit, metrics_address)
    finally:
        lock.release()


def _run(source, kube, node_name, netns, pin_root, state_dir, node_options: dict,
         resync_interval, once, cleanup_on_exit, metrics_address) -> None:
    services = metrics_server = None

    from cn2mirror.agent.datapath import DatapathError
    from cn2mirror.agent.node import Node
    from cn2mirror.agent.runtime import Agent

    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        try:
            node = Node(pin_root, netns=netns, **node_options)
            runner = Agent(source, node_name, node, state_dir, resync_interval)
            log.info("starting on node %s%s, pins under %s", node_name,
                     f" (network namespace {netns})" if netns else "", pin_root)
            runner.start()
        except (DatapathError, OSError) as e:
            raise AgentError(f"cannot start the datapath: {e}") from None
        try:
            if kube is not None:  # metrics, status (leader-elected) and Events
                from cn2mirror.agent.services import start_services

                services = start_services(kube, source, node_name, agent=runner,
                                          pin_root=pin_root, state_dir=state_dir)
            elif metrics_address:  # file mode: metrics and probes all the same
                from cn2mirror.agent.metrics import parse_address, serve_agent

                try:
                    metrics_server = serve_agent(runner, metrics_address, pin_root, state_dir)
                except OSError as e:
                    raise AgentError(f"--metrics-address {metrics_address}: {e}") from None
                log.info("serving /metrics, /healthz and /readyz on %s:%d",
                         parse_address(metrics_address)[0], metrics_server.port)
            if once:
                if not runner.wait_for(1, ONCE_TIMEOUT):
                    raise AgentError(f"the source gave no objects within {ONCE_TIMEOUT:.0f} s")
                report = runner.last_report
                for p in runner.errors:
                    click.echo(f"problem: {p}", err=True)
                if report is None or not report.ok:
                    raise AgentError("the state could not be applied"
                                     + (f": {report.exception}" if report else ""))
                if not log.isEnabledFor(logging.INFO):  # else the log said it already
                    click.echo(report.summary(), err=True)
            else:
                while not stop.wait(1.0):
                    pass
                log.info("stopping (%s)", "removing the datapath" if cleanup_on_exit
                         else "the datapath keeps mirroring")
        finally:
            if services is not None:
                services.stop()
            if metrics_server is not None:
                metrics_server.stop()
            runner.stop(cleanup=cleanup_on_exit)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    agent(prog_name="cn2mirror agent")
