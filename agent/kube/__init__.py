"""The Kubernetes API as the agent's source of objects: list, watch, cache, snapshot.

``KubeSource`` implements the runtime's ``Source`` protocol: ``start(on_change)`` calls
``on_change`` with a complete :class:`Snapshot` (every watched kind listed at least once)
whenever the objects changed, debounced; ``ready()`` says whether the source is in sync
with the API server; ``stop()`` ends it.

What is watched
  Pods and Namespaces (all of them: remote pods make endpoint sets and analyzers), and
  MirrorDestination, ContrailSecurityPolicy and GlobalContrailSecurityPolicy under this
  project's group and under CN2's (core.contrail.juniper.net) where the API server serves
  them, found by discovery (and looked for again every ``rediscover`` seconds, so CRDs
  installed later are picked up). One version per group is watched: the server's
  preferred one when cn2mirror reads it, else the newest one it reads.

How
  One thread per resource, a reflector as client-go has them: a paginated list, then a
  watch from the list's resourceVersion with bookmarks. A watch that ends (server
  timeout) or breaks (connection cut mid-stream) is resumed from the last
  resourceVersion seen, immediately the first time and with exponential backoff (with
  jitter) after that; 410 Gone (the version was compacted) relists. Each resource keeps
  a cache keyed by namespace/name holding the object's uid and resourceVersion: an
  event for an older or equal version of the same object is ignored (never applied
  twice), a relist replaces the cache and removes what is gone (nothing lost). While a
  resource cannot reach the API server ``ready()`` is False and snapshots stop; the
  runtime keeps the datapath as it is. A line that is not JSON, or an event whose object
  has no name, is counted and logged and skipped; the stream goes on.

Objects are trimmed as they arrive (managedFields and last-applied annotations go; pods
keep only what the compiler reads), which keeps the agent small with 10,000 pods and
means a pod status update that changes nothing cn2mirror reads makes no snapshot.
Changes of ``status`` alone on cn2mirror's own objects (the status writer's) do not
make one either.

The package: resources.py (what is watched, discovery, trimming), reflector.py (list
and watch one resource), source.py (KubeSource: the caches, debounce, snapshots,
metrics), client.py (kubeconfig or in-cluster, KubeOptions). The command-line options
are cli/kube_options.py; the wiring of status, leader election and metrics around the
source is agent/services.py.
"""


from .client import KubeOptions, api_client, default_namespace
from .resources import NAMESPACES, PODS, WatchedResource, discover, trim
from .source import KubeSource

__all__ = ["NAMESPACES", "PODS", "KubeOptions", "KubeSource", "WatchedResource", "api_client",
           "default_namespace", "discover", "trim"]
