"""The agent's reconcile loop, shared by every source of cluster objects.

A *source* (agent/filesource.py for YAML files, agent/kube.py for the Kubernetes API)
delivers complete :class:`~cn2mirror.agent.snapshot.Snapshot` objects; the
:class:`Agent` turns each one into the node's datapath state and applies it::

    source --on_change(snapshot)--> Agent: Compiler.compile -> Node.apply -> names.json

The Source protocol (all a new source has to implement):

``start(on_change)``
    Begin watching the inputs. Call ``on_change(snapshot)`` with a *complete* Snapshot
    (every object the source knows, never a delta) whenever the inputs changed, after
    debouncing bursts of changes; at least once, as soon as the first complete view is
    known. May call it from any thread, and synchronously from within ``start``.
    ``on_change`` never blocks (the Agent only stores the snapshot and wakes its worker)
    and never raises. An object (a dict) handed over once is never changed in place: a
    changed object comes as a new dict (the compiler keeps what it parsed from each dict
    for as long as the same dict keeps coming).
``stop()``
    Stop watching; idempotent. After it returns, ``on_change`` is not called again.
``ready() -> bool``
    Whether the source has delivered a complete view (for readiness probes).
``errors`` (optional attribute or property)
    The problems with the inputs as of the last ``on_change`` call: a sequence of
    objects with a readable ``str()`` (``LoadError`` for files). The Agent reports them
    with its own. Update it *before* calling ``on_change``.

The Agent:

- reconciles on its own worker thread, so sources never wait for the datapath; snapshots
  that arrive while it works are coalesced (only the newest is applied);
- re-applies the last state every ``resync_interval`` seconds, so that what the node's
  tables did not have yet (a pod's veth or route, an analyzer's neighbour) is picked up;
- never dies of one bad reconcile: an exception is recorded and logged, with what the
  datapath holds after it (Node.apply writes all or nothing: agent/programmer.py);
  invalid objects are the compiler's ObjectErrors and leave
  every other object applied;
- writes ``<state_dir>/names.json`` (agent.node.describe: what every number in the maps
  stands for), ``<state_dir>/capture-names.json`` (mirror/session ids -> names, the
  ``cn2mirror capture --names`` format) and ``<state_dir>/status.json`` (see
  :meth:`Agent.status`), each atomically (write, then rename).

Hooks for other components (metrics, the Kubernetes status writer, the CLI):
``last_state``, ``desired_state``, ``last_result``, ``errors``, ``ready()``,
``reconcile_count``, ``last_report`` (a :class:`ReconcileReport`: duration, latency,
changes, ...), ``add_listener(fn)`` (called with every ReconcileReport, on the worker
thread) and ``explain(...)``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .compiler import Compiler, id_table, session_table
from .defaults import DEFAULT_RESYNC_INTERVAL
from .explain import explain
from .node import ApplyResult, describe
from .snapshot import Snapshot
from .state import NodeState
from .statefiles import (
    CAPTURE_NAMES_FILE,
    NAMES_FILE,
    STATE_FILE_MODE,
    STATUS_FILE,
    private_dir,
    write_atomic,
)

log = logging.getLogger(__name__)

RETRY_FIRST = 0.5  # seconds before a failed reconcile is first retried
# While a destination cannot be resolved (no route to its analyzer, its MAC not on this
# node), the node's tables are looked at again soon, backing off from RETRY_FIRST up to
# this (or the resync interval if shorter): an analyzer that comes back gets its copies
# within seconds, not at the next full resync.
UNRESOLVED_RETRY_MAX = 5.0

def _backoff(attempt: int, cap: float) -> float:
    """RETRY_FIRST, doubling with each attempt (1, 2, ...), at most ``cap``."""
    return min(RETRY_FIRST * 2 ** (attempt - 1), cap)


# Where a problem comes from.
ORIGIN_SOURCE = "source"  # an input could not be read (a file, a watch)
ORIGIN_COMPILER = "compiler"  # an object is invalid or refers to something unusable
ORIGIN_DATAPATH = "datapath"  # the node cannot do it now (no interface, no route, ...)
ORIGIN_AGENT = "agent"  # a whole reconcile failed


@runtime_checkable
class Source(Protocol):
    """Where cluster objects come from; see the module documentation for the contract."""

    def start(self, on_change: Callable[[Snapshot], None]) -> None: ...

    def stop(self) -> None: ...

    def ready(self) -> bool: ...


@dataclass(frozen=True)
class Problem:
    """One thing the agent could not do, and why; the rest is applied regardless."""

    origin: str  # ORIGIN_*
    kind: str  # "File", "ContrailSecurityPolicy", "Interface", "Reconcile", ...
    name: str
    reason: str

    def __str__(self) -> str:
        what = f"{self.kind} {self.name}".strip()
        return f"{what}: {self.reason}" if what else self.reason

    def as_dict(self) -> dict[str, str]:
        return {"origin": self.origin, "kind": self.kind, "name": self.name,
                "reason": self.reason}


@dataclass(frozen=True)
class ReconcileReport:
    """What one reconcile (a new snapshot, or a periodic resync) did."""

    number: int  # 1, 2, ... over the agent's life (resyncs included)
    trigger: str  # "snapshot" or "resync"
    ok: bool  # the state was compiled and applied
    started: float  # Unix time
    duration_s: float  # compile + apply + files
    latency_s: float  # from the snapshot's arrival (or the resync's due time) to applied
    policies: int = 0
    rules: int = 0
    interfaces: int = 0  # interfaces the state wants
    attached_interfaces: int = 0  # of those, found on the node and attached
    destinations: int = 0
    changes: int = 0  # map entries written or removed
    attached: tuple[str, ...] = ()
    detached: tuple[int, ...] = ()
    problems: tuple[Problem, ...] = ()
    exception: str | None = None
    repairs: tuple[str, ...] = ()  # attachments the resync found broken and repaired

    def summary(self) -> str:
        """The one-line log summary."""
        head = f"reconcile #{self.number} ({self.trigger})"
        if not self.ok:
            return f"{head} FAILED after {self.duration_s * 1000:.0f} ms: {self.exception}"
        text = (f"{head} applied in {self.duration_s * 1000:.0f} ms: "
                f"{self.policies} policies, {self.rules} rules, "
                f"{self.attached_interfaces}/{self.interfaces} interfaces, "
                f"{self.destinations} destinations, {self.changes} map changes")
        if self.attached or self.detached:
            text += f" (+{len(self.attached)} -{len(self.detached)} attachments)"
        if self.repairs:
            text += f", {len(self.repairs)} attachments repaired"
        n = len(self.problems)
        return text + (f"; {n} problem{'s' if n != 1 else ''}" if n else "; no problems")

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number, "trigger": self.trigger, "ok": self.ok,
            "started": round(self.started, 3), "duration_s": round(self.duration_s, 6),
            "latency_s": round(self.latency_s, 6), "policies": self.policies,
            "rules": self.rules, "interfaces": self.interfaces,
            "attached_interfaces": self.attached_interfaces,
            "destinations": self.destinations, "changes": self.changes,
            "attached": list(self.attached), "detached": list(self.detached),
            "exception": self.exception, "repairs": list(self.repairs),
        }


def source_problems(errors: Iterable[Any]) -> list[Problem]:
    """A source's ``errors`` as Problems (LoadError: file and document; else str())."""
    out = []
    for e in errors:
        path = getattr(e, "path", None)
        if path is not None and hasattr(e, "document"):
            name = path + (f" document {e.document}" if e.document else "")
            if getattr(e, "line", None) is not None:
                name += f" (line {e.line})"
            out.append(Problem(ORIGIN_SOURCE, "File", name, e.reason))
        else:
            out.append(Problem(ORIGIN_SOURCE, "", "", str(e)))
    return out


def state_problems(state: NodeState) -> list[Problem]:
    return [Problem(ORIGIN_COMPILER, e.kind, e.name, e.reason) for e in state.errors]


def apply_problems(result: ApplyResult) -> list[Problem]:
    out = []
    for obj, why in sorted(result.problems.items()):
        kind, _, name = obj.partition(" ")
        out.append(Problem(ORIGIN_DATAPATH, kind, name, why))
    return out


def capture_names(state: NodeState) -> dict[str, dict[str, str]]:
    """Mirror and session ids -> readable names, in ``cn2mirror capture --names`` format."""
    mirror = {str(mid): key for mid, key in id_table(state).items()}
    for p in state.policies:
        for r in p.rules:
            if r.destination is not None:
                mirror[str(r.mirror_id)] = f"{p.name} rule {r.index}"
    for i in state.interfaces:
        for m in i.port_mirrors:
            mirror[str(m.mirror_id)] = f"port mirror {i.key} -> {m.destination}"
    session = {str(sid): key for sid, key in session_table(state).items()}
    return {"mirror": mirror, "session": session}


def _datapath_after(exc: Exception) -> str:
    """What the datapath holds after a failed reconcile, as far as it is known."""
    unchanged = getattr(exc, "datapath_unchanged", None)
    if unchanged is None and getattr(exc, "before_apply", False):
        unchanged = True
    if unchanged:
        return "the datapath keeps what it last applied"
    if unchanged is False:
        return ("the datapath holds part of the new state; the next reconcile writes it "
                "again")
    return "what the datapath holds now is not known; the next reconcile writes it again"


class Agent:
    """Applies every snapshot a source delivers to one node's datapath.

    ``node`` is an agent.node.Node (or anything with its start/apply/stop); the Agent
    calls it from its worker thread only, after ``start()`` has called ``node.start()``.
    """

    def __init__(self, source: Source, node_name: str, node, state_dir: str,
                 resync_interval: float = DEFAULT_RESYNC_INTERVAL):
        if resync_interval <= 0:
            raise ValueError("resync_interval must be positive")
        self.source = source
        self.node_name = node_name
        self.node = node
        self.state_dir = state_dir
        self.resync_interval = resync_interval

        self.desired_state: NodeState | None = None  # last compiled
        self.last_state: NodeState | None = None  # last applied successfully
        self.last_result: ApplyResult | None = None
        self.last_snapshot: Snapshot | None = None
        self.last_report: ReconcileReport | None = None
        self.compiler = Compiler(node_name)  # remembers: a change costs what it touches
        self._written: dict[str, Any] = {}  # file name -> what this agent last wrote there
        self.reconcile_count = 0
        self.failed_count = 0
        self.consecutive_failures = 0  # reconciles failed in a row: the retry backs off
        self.consecutive_unresolved = 0  # applied with a destination unresolved, in a row
        self.errors: tuple[Problem, ...] = ()
        self.errors_before: tuple[Problem, ...] = ()

        self._cond = threading.Condition()
        self._pending: Snapshot | None = None
        self._pending_since = 0.0
        self._stopping = False
        self._started = False
        self._stopped = False
        self._worker: threading.Thread | None = None
        self._listeners: list[Callable[[ReconcileReport], None]] = []
        self._next_resync = float("inf")
        self._repairs: tuple[str, ...] = ()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start the datapath (adopting pinned state), the worker, then the source."""
        if self._started:
            return
        # A status file left by an earlier agent must not say "ready" for this one.
        try:
            private_dir(self.state_dir)  # also an existing one, left world-readable
            for name in (NAMES_FILE, CAPTURE_NAMES_FILE, STATUS_FILE):
                path = os.path.join(self.state_dir, name)
                if os.path.exists(path):
                    os.chmod(path, STATE_FILE_MODE)
            write_atomic(os.path.join(self.state_dir, STATUS_FILE), self.status())
        except OSError as e:
            log.error("cannot write status to %s: %s", self.state_dir, e)
        self.node.start()
        self._started = True
        self._worker = threading.Thread(target=self._run, name="cn2mirror-reconcile",
                                        daemon=True)
        self._worker.start()
        try:
            self.source.start(self.on_change)
        except BaseException:
            self.stop()
            raise

    def stop(self, cleanup: bool = False) -> None:
        """Stop the source and the worker, then leave the datapath running (mirroring
        continues; a restarted agent adopts it) or, with ``cleanup``, remove it."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.source.stop()
        except Exception:
            log.exception("stopping the source failed")
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join()
        if self._started:
            self.node.stop(cleanup=cleanup)

    def add_listener(self, fn: Callable[[ReconcileReport], None]) -> None:
        """Call ``fn(report)`` after every reconcile, on the worker thread. Exceptions in
        listeners are logged and ignored."""
        self._listeners.append(fn)

    # ------------------------------------------------------------------ input
    def on_change(self, snapshot: Snapshot) -> None:
        """The sources' callback: keeps the newest snapshot and wakes the worker."""
        with self._cond:
            if self._pending is None:
                self._pending_since = time.monotonic()
            self._pending = snapshot
            self._cond.notify_all()

    def resync_now(self) -> None:
        """Re-apply the desired state as soon as the worker is free."""
        with self._cond:
            self._next_resync = time.monotonic()
            self._cond.notify_all()

    # ------------------------------------------------------------------ status
    def ready(self) -> bool:
        """The source has a complete view and a reconcile has applied it."""
        try:
            source_ready = self.source.ready()
        except Exception:
            source_ready = False
        return bool(source_ready and self.last_state is not None)

    def wait_for(self, count: int = 1, timeout: float | None = None) -> bool:
        """Wait until ``count`` reconciles (successful or not) have run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.reconcile_count < count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def explain(self, src_ip: str, dst_ip: str, protocol: int | str,
                dst_port: int | None = None, **kwargs):
        """explain() (agent/explain.py) on the last applied state (None before the first apply)."""
        state = self.last_state
        kwargs.setdefault("sampling_seed", getattr(self.node, "flow_sampling_seed", None))
        return None if state is None else explain(state, src_ip, dst_ip, protocol, dst_port,
                                                  **kwargs)

    def status(self) -> dict[str, Any]:
        """What status.json holds (version 1)::

            {"version": 1, "node": str, "ready": bool, "reconciles": int, "failed": int,
             "last": ReconcileReport.as_dict() or null,
             "errors": [{"origin", "kind", "name", "reason"}],
             "attachment": {"mode": "tcx" | "legacy", "pod_side": bool,
                            "repairs": {kind: count}, "unrepaired": {what: why}} or null}
        """
        report = self.last_report
        return {
            "version": 1,
            "node": self.node_name,
            "ready": self.ready(),
            "reconciles": report.number if report else 0,
            "failed": self.failed_count,
            "last": report.as_dict() if report else None,
            "errors": [p.as_dict() for p in self.errors],
            "attachment": self._attachment(),
        }

    def _attachment(self) -> dict | None:
        report = getattr(self.node, "attachment_report", None)
        if report is None or not self._started:
            return None
        try:
            return report()
        except Exception as e:  # a status file is still written
            return {"error": str(e)}

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and self._pending is None and \
                        time.monotonic() < self._next_resync:
                    wait = self._next_resync - time.monotonic()
                    self._cond.wait(None if wait == float("inf") else max(wait, 0.0))
                if self._stopping:
                    return
                snapshot, since = self._pending, self._pending_since
                self._pending = None
                if snapshot is None:
                    since = self._next_resync
            try:
                if snapshot is not None:
                    self.reconcile(snapshot, since)
                else:
                    self.resync(since)
            except Exception:  # never reached: reconcile() catches; belt and braces
                log.exception("reconcile loop error")

    def reconcile(self, snapshot: Snapshot, since: float | None = None) -> ReconcileReport:
        """Compile ``snapshot`` for this node and apply it. Called by the worker; tests
        may call it directly on an agent whose worker is not running."""
        self.last_snapshot = snapshot
        started, t0 = time.time(), time.monotonic()
        try:
            state = self.compiler.compile(snapshot)
        except Exception as e:  # a compiler bug must not stop the agent
            log.exception("compiling the snapshot failed")
            e.before_apply = True  # nothing reached the datapath
            self.compiler = Compiler(self.node_name)  # what it kept may be half updated
            return self._finish("snapshot", started, t0, since, None, None, e)
        self.desired_state = state
        return self._apply(state, "snapshot", started, t0, since)

    def resync(self, since: float | None = None) -> ReconcileReport | None:
        """Re-apply the desired state (the node's tables may have changed)."""
        state = self.desired_state
        if state is None:
            with self._cond:
                self._next_resync = time.monotonic() + self.resync_interval
            return None
        return self._apply(state, "resync", time.time(), time.monotonic(), since)

    def _apply(self, state: NodeState, trigger: str, started: float, t0: float,
               since: float | None) -> ReconcileReport:
        repairs: list[str] = []
        heal = getattr(self.node, "heal", None)
        if trigger == "resync" and heal is not None:
            # Self-healing: what a CNI (or anyone) removed or pushed aside since the last
            # look is put back before the state is applied again.
            try:
                repairs = heal()
            except Exception as e:
                log.error("checking the attachments failed: %s", e)
                log.debug("heal failure", exc_info=True)
        self._repairs = tuple(repairs)
        try:
            result = self.node.apply(state)
        except Exception as e:
            log.error("applying the state failed: %s", e)
            log.debug("apply failure", exc_info=True)
            return self._finish(trigger, started, t0, since, state, None, e)
        self.last_state, self.last_result = state, result
        try:
            self._write_files(state, result)
        except OSError as e:
            log.error("cannot write to state directory %s: %s", self.state_dir, e)
        return self._finish(trigger, started, t0, since, state, result, None)

    def _finish(self, trigger: str, started: float, t0: float, since: float | None,
                state: NodeState | None, result: ApplyResult | None,
                exc: Exception | None) -> ReconcileReport:
        now = time.monotonic()
        problems: list[Problem] = source_problems(getattr(self.source, "errors", ()) or ())
        shown = state if state is not None else self.desired_state
        if shown is not None:
            problems += state_problems(shown)
        if result is not None:
            problems += apply_problems(result)
        elif self.last_result is not None and exc is not None:
            problems += apply_problems(self.last_result)
        if exc is not None:
            problems.append(Problem(ORIGIN_AGENT, "Reconcile", "",
                                    f"{type(exc).__name__}: {exc}; {_datapath_after(exc)}"))
        n_ifaces = len(state.interfaces) if state else 0
        report = ReconcileReport(
            number=self.reconcile_count + 1,
            trigger=trigger,
            ok=exc is None,
            started=started,
            duration_s=now - t0,
            latency_s=now - (since if since is not None else t0),
            policies=len(state.policies) if state else 0,
            rules=sum(len(p.rules) for p in state.policies) if state else 0,
            interfaces=n_ifaces,
            attached_interfaces=len(result.ifindexes) if result else 0,
            destinations=len(state.destinations) if state else 0,
            changes=result.changes if result else 0,
            attached=tuple(result.attached) if result else (),
            detached=tuple(result.detached) if result else (),
            problems=tuple(problems),
            exception=None if exc is None else f"{type(exc).__name__}: {exc}",
            repairs=self._repairs if trigger == "resync" else (),
        )
        self.errors = report.problems
        self.last_report = report
        if exc is not None:
            self.failed_count += 1
        level = logging.INFO if report.ok and (trigger == "snapshot" or report.changes
                                              or report.repairs) \
            else logging.DEBUG if report.ok else logging.ERROR
        log.log(level, "%s", report.summary())
        self._log_problem_changes(self.errors_before, report.problems)
        self.errors_before = report.problems
        try:
            write_atomic(os.path.join(self.state_dir, STATUS_FILE), self.status())
        except OSError as e:
            log.error("cannot write status to %s: %s", self.state_dir, e)
        for fn in list(self._listeners):
            try:
                fn(report)
            except Exception:
                log.exception("reconcile listener failed")
        # Last, so that wait_for() returns once everything of this reconcile is done.
        with self._cond:
            self.reconcile_count = report.number
            if report.ok:
                self.consecutive_failures = 0
                self._next_resync = time.monotonic() + self._settle_delay(result)
            else:  # retried soon, backing off: 0.5 s, 1 s, 2 s ... up to the resync interval
                self.consecutive_failures += 1
                self._next_resync = time.monotonic() + self.retry_delay()
            self._cond.notify_all()
        return report

    def _settle_delay(self, result: ApplyResult | None) -> float:
        """After a successful apply: the resync interval, or sooner (backing off) while
        a destination is unresolved."""
        unresolved = result is not None and any(
            obj.startswith("MirrorDestination ") for obj in result.problems)
        if not unresolved:
            self.consecutive_unresolved = 0
            return self.resync_interval
        self.consecutive_unresolved += 1
        return _backoff(self.consecutive_unresolved,
                        min(UNRESOLVED_RETRY_MAX, self.resync_interval))

    def retry_delay(self) -> float:
        """How long after a failed reconcile the state is applied again."""
        return _backoff(max(self.consecutive_failures, 1), self.resync_interval)

    @staticmethod
    def _log_problem_changes(before: tuple[Problem, ...], now: tuple[Problem, ...]) -> None:
        """Each problem is logged when it appears and when it clears, not at every
        reconcile. (Node.apply logs the datapath's own when they appear.)"""
        old, new = set(before), set(now)
        for p in now:
            if p not in old and p.origin != ORIGIN_DATAPATH:
                log.warning("problem: %s", p)
        for p in before:
            if p not in new:
                log.info("cleared: %s", p)

    def _write_files(self, state: NodeState, result: ApplyResult) -> None:
        for name, data in ((NAMES_FILE, describe(state, result)),
                           (CAPTURE_NAMES_FILE, capture_names(state))):
            if self._written.get(name) != data:  # unchanged: not written (and synced) again
                write_atomic(os.path.join(self.state_dir, name), data)
                self._written[name] = data

