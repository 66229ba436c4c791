"""Connecting to the API server (kubeconfig or in-cluster) and the Kubernetes options of
``cn2mirror agent`` as plain values (``KubeOptions``; their command-line form is
cli/kube_options.py, their defaults agent/defaults.py)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from .. import defaults as D
from .source import KubeSource


def api_client(kubeconfig: str | None = None, context: str | None = None,
               in_cluster: bool | None = None, pool_size: int = 32) -> Any:
    """An ApiClient: in-cluster config when running in a pod (or asked for), otherwise the
    kubeconfig (``kubeconfig``, $KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if in_cluster is None:
        in_cluster = kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if in_cluster:
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=kubeconfig, context=context,
                                client_configuration=configuration)
    # Watches hold a connection each; the status writer and the lease need their own.
    configuration.connection_pool_maxsize = pool_size
    # The source and the elector retry on their own terms (backoff, deadlines).
    configuration.retries = False
    return client.ApiClient(configuration)


def default_namespace() -> str:
    """The agent's own namespace: $POD_NAMESPACE, the service account's, or
    cn2mirror-system."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    with contextlib.suppress(OSError):
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    return D.DEFAULT_NAMESPACE


@dataclass
class KubeOptions:
    """The Kubernetes options of ``cn2mirror agent`` (cli/kube_options.py makes them from
    the command line; agent/services.py start_services() uses them)."""

    kubeconfig: str | None = None
    context: str | None = None
    in_cluster: bool | None = None
    namespace: str | None = None
    lease_name: str = D.DEFAULT_LEASE_NAME
    lease_duration: float = D.DEFAULT_LEASE_DURATION
    renew_deadline: float = D.DEFAULT_RENEW_DEADLINE
    retry_period: float = D.DEFAULT_RETRY_PERIOD
    status: bool = True
    metrics_address: str | None = None
    debounce: float = D.DEFAULT_DEBOUNCE
    identity: str | None = None
    _client: Any = None

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > self.retry_period > 0:
            raise ValueError("need lease duration > renew deadline > retry period > 0")

    def api_client(self) -> Any:
        if self._client is None:
            self._client = api_client(self.kubeconfig, self.context, self.in_cluster)
        return self._client

    def source(self, node_name: str | None = None) -> KubeSource:
        return KubeSource(self.api_client(), node_name=node_name, debounce=self.debounce)
