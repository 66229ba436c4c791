"""The default of every option of the agent and the CLI, defined once.

The agent's classes take these as their parameters' defaults, and the click options
under cli/ show and use the same values: a default changed here changes both.
"""

from __future__ import annotations

from .layout import DEFAULT_MAX_FLOW_DESTS  # noqa: F401 (a layout constant: defined there)

# Where things are on a node.
DEFAULT_PIN_ROOT = "/sys/fs/bpf/cn2mirror"  # bpffs: the maps, programs and tcx links
DEFAULT_STATE_DIR = "/run/cn2mirror"  # names.json, capture-names.json, status.json

# The reconcile loop (agent/runtime.py) and the file source (agent/filesource.py).
DEFAULT_RESYNC_INTERVAL = 30.0  # seconds between re-applications of the last state
DEFAULT_POLL_INTERVAL = 1.0  # seconds between checks of --source files
DEFAULT_ATTACH_MODE = "auto"  # tcx when the kernel has it, else legacy clsact

# The Kubernetes source (agent/kube/) and its services (agent/services.py).
# Quiet time before a snapshot is made. Short: a reconcile of a few changed objects is
# cheap (incremental compile and plan), and snapshots that arrive while one runs are
# coalesced by the Agent (only the newest is applied).
DEFAULT_DEBOUNCE = 0.005
DEFAULT_NAMESPACE = "cn2mirror-system"  # the agent's own, when the pod does not say
DEFAULT_LEASE_NAME = "cn2mirror-status"  # elects the agent that writes status and Events
DEFAULT_LEASE_DURATION = 15.0
DEFAULT_RENEW_DEADLINE = 10.0
DEFAULT_RETRY_PERIOD = 2.0
# How often each node writes its counts of the copies to each MirrorDestination into that
# object's status.copies.<node> (agent/status.py CopyCountReporter), when they changed.
DEFAULT_COPY_COUNTS_INTERVAL = 30.0
DEFAULT_METRICS_ADDRESS = ":9464"  # no host: 127.0.0.1 (agent/metrics.py parse_address)
