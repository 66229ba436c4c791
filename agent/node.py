"""One node's datapath driven by desired states: the reconcile core every source shares.

``Node.apply(state)`` resolves the state against the node's tables, attaches the
classifier to new pod interfaces and detaches it from gone ones, and writes the maps by
diff. Called again with the same state it changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from . import layout
from .datapath import Datapath, DatapathError
from .discovery import NodeTables
from .netns import iproute
from .programmer import MapWriter, Plan, PlanError, Planner, copy_fit_flags
from .state import NodeState

log = logging.getLogger(__name__)


DEFAULT_STATE_DIR = "/run/cn2mirror"


@dataclass
class ApplyResult:
    plan: Plan
    changes: int
    attached: list[str] = field(default_factory=list)
    detached: list[int] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # object -> why not applied
    ifindexes: dict[str, int] = field(default_factory=dict)  # interface key -> ifindex


def describe(state: NodeState, result: ApplyResult) -> dict:
    """What every number in the maps stands for: the names file the CLI reads.

    Shape (stable; versioned by "version"):
    {"version": 1, "node": str, "generation_note": str,
     "rules": {slot: {"policy", "rule", "mirror_id", "destination"}},
     "destinations": {slot: {"name", "mode", "analyzer_ip", "analyzer_pod"}},
     "interfaces": {ifslot: {"key", "pod", "ifindex", "session_id"}},
     "problems": {object: reason}}
    Slots and ifslots are JSON object keys, so strings.
    """
    p = result.plan
    rules = {}
    by_policy = {pol.name: pol for pol in state.policies}
    port_mirrors = {(i.key, pm.destination): pm for i in state.interfaces
                    for pm in i.port_mirrors}
    for slot, (owner, index) in p.rule_slots.items():
        if owner.startswith("port:"):
            _, key, dest = owner.split(":", 2)
            pm = port_mirrors.get((key, dest))
            rules[str(slot)] = {"policy": None, "port_mirror": key, "rule": None,
                                "mirror_id": pm.mirror_id if pm else None,
                                "destination": dest,
                                "direction": str(pm.direction) if pm else None}
            continue
        rule = by_policy[owner].rules[index] if owner in by_policy else None
        rules[str(slot)] = {"policy": owner, "port_mirror": None,
                            "rule": rule.index if rule else index,
                            "mirror_id": rule.mirror_id if rule else None,
                            "destination": rule.destination if rule else None}
    dests = {}
    for name, slot in p.dest_slots.items():
        d = state.destination(name)
        dests[str(slot)] = {"name": name, "mode": str(d.mode) if d else None,
                            "analyzer_ip": d.analyzer_ip if d else None,
                            "analyzer_pod": d.analyzer_pod if d else None}
    ifaces = {}
    for key, ifslot in p.ifslots.items():
        i = state.interface(key)
        ifaces[str(ifslot)] = {"key": key, "pod": i.pod if i else None,
                               "ifindex": result.ifindexes.get(key),
                               "session_id": i.session_id if i else None}
    return {"version": 1, "node": state.node, "rules": rules, "destinations": dests,
            "interfaces": ifaces, "problems": dict(result.problems)}


class Node:
    def __init__(self, pin_root: str, netns: str | None = None,
                 max_flow_dests: int = layout.DEFAULT_MAX_FLOW_DESTS,
                 uplink: str | None = None):
        self.datapath = Datapath(pin_root, netns, max_flow_dests)
        self.uplink = uplink
        self.writer: MapWriter | None = None
        self.planner = Planner()  # keeps the tries from plan to plan
        self.attached: dict[int, str] = {}  # ifindex -> interface key
        self.last: ApplyResult | None = None
        # Local analyzer pods' host-side veths set up for the copies' GSO hand-off.
        self.handoff: set[int] = set()

    def start(self) -> None:
        """Load (adopting pinned maps), set up the mirror port, adopt attachments."""
        dp = self.datapath
        dp.load()
        dp.setup_mirror_port()
        self.writer = MapWriter(dp.maps, adopt=True)
        self.writer.set_mirror_port(dp.mirror_tx_index)
        # Interfaces attached by a previous run keep running; re-attaching replaces the
        # program in place (same handle), so mirroring never pauses.
        for ifindex in dp.attached_ifindexes():
            self.attached[ifindex] = ""

    def apply(self, state: NodeState) -> ApplyResult:
        dp = self.datapath
        ipr = iproute(dp.netns)
        try:
            tables = NodeTables(ipr)
            problems: dict[str, str] = {}
            ifindexes: dict[str, int] = {}
            for iface in state.interfaces:
                idx, how = tables.host_interface(iface)
                if idx:
                    ifindexes[iface.key] = idx
                else:
                    problems[f"Interface {iface.key}"] = how
            resolved = {}
            # Only destinations some rule or port mirror sends to get a device set up.
            used = {r.destination for p in state.policies for r in p.rules} | {
                pm.destination for i in state.interfaces for pm in i.port_mirrors}
            for d in state.destinations:
                r = tables.resolve_destination(d, self.uplink)
                r = dataclasses.replace(r, fit_flags=copy_fit_flags(d))
                if d.name in used and self._gso_handoff(tables, d, r):
                    r = dataclasses.replace(r, fit_flags=r.fit_flags | layout.DEST_GSO_HANDOFF)
                resolved[d.name] = r
                if r.problem:
                    problems[f"MirrorDestination {d.name}"] = r.problem
        finally:
            ipr.close()

        adopted = self.writer.current_ifslots()
        ifslots = {key: adopted[idx] for key, idx in ifindexes.items() if idx in adopted}
        try:
            p = self.planner.plan(state, ifindexes, resolved, ifslots)
        except PlanError as e:
            raise DatapathError(f"the state does not fit the datapath: {e}") from e

        # Attach new interfaces before writing their map entries; detach gone ones after.
        attached = []
        for key, idx in sorted(ifindexes.items(), key=lambda kv: kv[1]):
            if self.attached.get(idx) == key:
                continue
            try:
                dp.attach_index(idx, key)
            except DatapathError as e:
                problems[f"Interface {key}"] = str(e)
                ifindexes.pop(key)
                continue
            self.attached[idx] = key
            attached.append(key)
        if any(k not in ifindexes for k in p.ifslots):
            p = self.planner.plan(state, ifindexes, resolved, ifslots)
        changes = self.writer.apply(p)
        # Offloads back on the veths of analyzers no longer sent to (after the maps stopped
        # handing them super-packets).
        in_use = {r.out_ifindex for r in resolved.values()
                  if r.fit_flags & layout.DEST_GSO_HANDOFF}
        for idx in self.handoff - in_use:
            dp.set_gso_handoff(idx, False)
        self.handoff &= in_use
        detached = []
        wanted = set(ifindexes.values())
        for idx in [i for i in self.attached if i not in wanted]:
            dp.detach(idx)
            del self.attached[idx]
            detached.append(idx)
        result = ApplyResult(p, changes, attached, detached, problems, dict(ifindexes))
        before = self.last.problems if self.last else {}
        self.last = result
        for obj, why in problems.items():
            if before.get(obj) != why:  # a lasting problem is said once, not every resync
                log.warning("%s: %s", obj, why)
        return result

    def _gso_handoff(self, tables: NodeTables, d, r) -> bool:
        """Whether copies to `d` can be handed to the device they leave by as super-packets
        wrapped once: an analyzer pod on this node (jmirror over IPv4, reached directly
        over its veth), whose host side segments them and finishes their checksums once
        its offloads for that are off (set here). Anything else (an uplink, another
        node's analyzer) is segmented by the mirror port: offloads of shared devices are
        never touched."""
        if r.problem or r.mode != layout.Mode.JMIRROR4 or not d.analyzer_pod or \
                not r.out_ifindex or tables.kind(r.out_ifindex) != "veth":
            return False
        route = tables.route(d.analyzer_ip)
        if not route or route.gateway:
            return False
        if r.out_ifindex not in self.handoff:
            if not self.datapath.set_gso_handoff(r.out_ifindex, True):
                return False
            self.handoff.add(r.out_ifindex)
        return True

    def stop(self, cleanup: bool = False) -> None:
        """Leave the datapath running (default) or remove every trace of it."""
        dp = self.datapath
        if cleanup:
            for idx in self.handoff:
                dp.set_gso_handoff(idx, False)
            self.handoff.clear()
            for idx in list(self.attached):
                dp.detach(idx)
            self.attached.clear()
            dp.teardown_mirror_port()
            dp.close()
            dp.remove_pins()
        else:
            dp.close()
