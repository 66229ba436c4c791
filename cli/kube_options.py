"""The Kubernetes options of ``cn2mirror agent`` on the command line, and the
KubeOptions (agent/kube/client.py) they make. Their defaults: agent/defaults.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from cn2mirror.agent import defaults as D
from cn2mirror.agent.kube.client import KubeOptions


def kube_options(f: Callable | None = None) -> Any:
    """The Kubernetes options of ``cn2mirror agent``, as click options.

    ``kube_options()`` is the list (to add to cli/agent_cmd.py's SOURCE_OPTIONS);
    ``@kube_options`` decorates a command with them. Either way the command receives
    them as ``kube_*`` parameters, which ``kube_options_from_params(params)`` takes.
    """
    options = [
        click.option("--kubernetes", "kube_enabled", is_flag=True,
                     help="Read objects from the Kubernetes API (in-cluster config in a "
                          "pod, else the kubeconfig)."),
        click.option("--kubeconfig", "kube_kubeconfig", metavar="FILE",
                     type=click.Path(dir_okay=False), default=None,
                     help="Kubeconfig file [default: in a pod the in-cluster config, "
                          "else $KUBECONFIG or ~/.kube/config]."),
        click.option("--context", "kube_context", metavar="NAME", default=None,
                     help="Kubeconfig context to use."),
        click.option("--namespace", "kube_namespace", envvar="POD_NAMESPACE", metavar="NS",
                     default=None,
                     help="The agent's namespace, for its Lease [default: $POD_NAMESPACE, "
                          "else the pod's]."),
        click.option("--lease-name", "kube_lease_name", default=D.DEFAULT_LEASE_NAME,
                     show_default=True, metavar="NAME",
                     help="The Lease that elects the agent writing status and Events."),
        click.option("--lease-duration", "kube_lease_duration", type=float,
                     default=D.DEFAULT_LEASE_DURATION,
                     show_default=True, metavar="SECONDS",
                     help="How long a lease holds without renewal."),
        click.option("--renew-deadline", "kube_renew_deadline", type=float,
                     default=D.DEFAULT_RENEW_DEADLINE,
                     show_default=True, metavar="SECONDS",
                     help="How long the leader tries to renew before it stops writing."),
        click.option("--retry-period", "kube_retry_period", type=float,
                     default=D.DEFAULT_RETRY_PERIOD,
                     show_default=True, metavar="SECONDS",
                     help="Time between lease attempts."),
        click.option("--status/--no-status", "kube_status", default=True, show_default=True,
                     help="Take part in the election to write object status and Events."),
        click.option("--metrics-address", "kube_metrics_address", envvar="METRICS_ADDRESS",
                     metavar="HOST:PORT", default=None,
                     help="Serve /metrics, /healthz and /readyz here (any source): "
                          "HOST:PORT, e.g. "
                          "the node's address $(NODE_IP):9464 for Prometheus; :9464 is "
                          "127.0.0.1:9464 (this node only)."),
        click.option("--debounce", "kube_debounce", type=float, default=D.DEFAULT_DEBOUNCE,
                     show_default=True, metavar="SECONDS",
                     help="Quiet time after an API change before it is applied."),
    ]
    if f is None:
        return options
    for option in reversed(options):
        f = option(f)
    return f


def kube_options_from_params(params: dict[str, Any]) -> KubeOptions | None:
    """Takes (pops) the ``kube_*`` parameters that ``kube_options`` added from a click
    command's parameters; a KubeOptions with --kubernetes, else None."""
    values = {k[len("kube_"):]: params.pop(k) for k in list(params) if k.startswith("kube_")}
    if not values.pop("enabled", False):
        return None
    try:
        return KubeOptions(**values)
    except ValueError:
        raise click.BadParameter("need --lease-duration > --renew-deadline > "
                                 "--retry-period > 0") from None
