"""One node's datapath driven by desired states: the reconcile core every source shares.

``Node.apply(state)`` resolves the state against the node's tables, attaches the
classifier to new pod interfaces and detaches it from gone ones, and writes the maps by
diff. Called again with the same state it changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field

from . import layout
from .capacity import Limits, fit, has_namespace_limits
from .datapath import Datapath, DatapathError
from .defaults import DEFAULT_ATTACH_MODE
from .discovery import NodeTables, Placement
from .netns import iproute
from .programmer import (
    TRIES,
    CopyBudget,
    MapWriteError,
    MapWriter,
    Plan,
    PlanError,
    Planner,
    copy_fit_flags,
    copy_limits_of,
)
from .state import NodeState

log = logging.getLogger(__name__)



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


def one_owner_per_interface(placed: dict[str, Placement],
                            problems: dict[str, str]) -> dict[str, Placement]:
    """Each host interface for one pod interface only. When several claim one, the one
    proven from the node's tables keeps it (then the first by key, so every run decides
    the same); the conflict is said on every claimant, winner included."""
    by_ifindex: dict[int, list[str]] = {}
    for key, p in placed.items():
        by_ifindex.setdefault(p.ifindex, []).append(key)
    kept = dict(placed)
    for keys in by_ifindex.values():
        if len(keys) < 2:
            continue
        keys.sort(key=lambda k: (not placed[k].proven, k))
        owner, others = keys[0], keys[1:]
        where = placed[owner]
        problems[f"Interface {owner}"] = (
            f"keeps {where.ifname} ({where.how}); also claimed by {', '.join(others)}")
        for key in others:
            del kept[key]
            problems[f"Interface {key}"] = (
                f"{where.ifname} ({placed[key].how}) belongs to {owner} "
                f"({where.how}{'' if where.proven else ', claimed first'}): not attached")
    return kept


class ApplyError(DatapathError):
    """Node.apply failed. ``datapath_unchanged``: the maps hold exactly what the last
    successful apply wrote (nothing was written, or every write was put back)."""

    def __init__(self, message: str, datapath_unchanged: bool):
        super().__init__(message)
        self.datapath_unchanged = datapath_unchanged


class Node:
    def __init__(self, pin_root: str, netns: str | None = None,
                 max_flow_dests: int = layout.DEFAULT_MAX_FLOW_DESTS,
                 uplink: str | None = None, attach_mode: str = DEFAULT_ATTACH_MODE,
                 pod_side: bool = False, limits: Limits | None = None,
                 copy_budget: CopyBudget | None = None, flow_sampling_seed: int = 0):
        self.datapath = Datapath(pin_root, netns, max_flow_dests)
        self.datapath.set_attach_mode(attach_mode)
        # The to-pod direction classified inside each pod (for bpf_redirect_peer CNIs).
        self.datapath.pod_side = pod_side
        self.repairs: Counter[str] = Counter()  # kind of repair -> times made (heal())
        self._unrepairable: dict[str, str] = {}  # what -> why (said once)
        self.uplink = uplink
        self.limits = limits or Limits()  # per-namespace limits; capacities at start()
        # The node's copy budget (issue 15): the default unless the agent was told.
        self.copy_budget = copy_budget if copy_budget is not None else CopyBudget()
        # Flow sampling's hash seed, the same on every node (0: layout.SAMPLE_SEED).
        self.flow_sampling_seed = flow_sampling_seed
        self.writer: MapWriter | None = None
        self.planner = Planner()  # keeps the tries from plan to plan
        self.attached: dict[int, str] = {}  # ifindex -> interface key
        self.placed: dict[str, Placement] = {}  # interface key -> where it was placed last
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
        self.writer.set_sampling_seed(self.flow_sampling_seed)
        # What the fitting pass may use: the maps as the kernel made them.
        caps = self.writer.capacities
        self.limits = dataclasses.replace(
            self.limits,
            interfaces=min(layout.MAX_INTERFACES, caps.get("interfaces",
                                                           layout.MAX_INTERFACES)) - 1,
            tries={m: caps.get(m, layout.LPM_ENTRIES) for m in TRIES})
        # Interfaces attached by a previous run keep running; re-attaching replaces the
        # program in place (BPF_LINK_UPDATE of the pinned tcx link, or the same legacy
        # filter handle), so mirroring never pauses.
        log.info("pod interfaces are attached with %s%s", dp.mode(),
                 ", the to-pod direction inside each pod" if dp.pod_side else "")
        for ifindex in dp.attached_ifindexes():
            self.attached[ifindex] = ""

    def apply(self, state: NodeState) -> ApplyResult:
        dp = self.datapath
        ipr = iproute(dp.netns)
        try:
            tables = NodeTables(ipr, dp.netns)
            problems: dict[str, str] = {}
            placed: dict[str, Placement] = {}
            for iface in state.interfaces:
                found = tables.place(iface, self.placed.get(iface.key))
                if isinstance(found, str):
                    problems[f"Interface {iface.key}"] = found
                    continue
                placed[iface.key] = found
            placed = one_owner_per_interface(placed, problems)
            self.placed = placed
            ifindexes = {key: p.ifindex for key, p in placed.items()}
            resolved = {}
            # Only destinations some rule or port mirror sends to get a device set up.
            used = {r.destination for p in state.policies for r in p.rules} | {
                pm.destination for i in state.interfaces for pm in i.port_mirrors}
            for d in state.destinations:
                r = tables.resolve_destination(d, self.uplink)
                r = dataclasses.replace(r, fit_flags=copy_fit_flags(d), **copy_limits_of(d))
                if d.name in used and self._gso_handoff(tables, d, r):
                    r = dataclasses.replace(r, fit_flags=r.fit_flags | layout.DEST_GSO_HANDOFF)
                resolved[d.name] = r
                if r.problem:
                    problems[f"MirrorDestination {d.name}"] = r.problem
        finally:
            ipr.close()

        # Objects over a per-namespace limit, then (only when the plan does not fit)
        # over the node's capacity, are left out one by one (agent/capacity.py), each
        # named in problems; the rest is applied.
        if has_namespace_limits(self.limits):
            state, rejected = fit(state, set(ifindexes), self.limits, node=False)
            problems.update(rejected)
            for key in [k for k in ifindexes if state.interface(k) is None]:
                del ifindexes[key]  # a pod left out is not attached either
        adopted = self.writer.current_ifslots()
        ifslots = {key: adopted[idx] for key, idx in ifindexes.items() if idx in adopted}

        def fitted_plan(state: NodeState) -> tuple[NodeState, Plan]:
            try:
                p = self.planner.plan(state, ifindexes, resolved, ifslots,
                                      self.copy_budget)
                self.writer.check_capacity(p)
                return state, p
            except PlanError:
                state, rejected = fit(state, set(ifindexes), self.limits, namespaces=False)
                if not rejected:
                    raise
            problems.update(rejected)
            for key in [k for k in ifindexes if state.interface(k) is None]:
                del ifindexes[key]  # a pod left out is not attached either
            return state, self.planner.plan(state, ifindexes, resolved, ifslots,
                                            self.copy_budget)

        try:
            state, p = fitted_plan(state)
            self.writer.check_capacity(p)
        except PlanError as e:
            raise ApplyError(f"the state does not fit the datapath: {e}; nothing was "
                             "written", datapath_unchanged=True) from e

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
            p = self.planner.plan(state, ifindexes, resolved, ifslots, self.copy_budget)
        try:
            changes = self.writer.apply(p)
        except PlanError as e:
            raise ApplyError(f"the state does not fit the datapath: {e}; nothing was "
                             "written", datapath_unchanged=True) from e
        except MapWriteError as e:
            # Interfaces attached just now have no entry (it was put back): their
            # classifier passes every packet untouched until the next apply.
            raise ApplyError(str(e), datapath_unchanged=e.restored) from e
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

    # ------------------------------------------------------------------ self-healing
    def heal(self) -> list[str]:
        """Compare what the kernel holds with what should be there, and repair it: the
        mirror port (its devices and programs), and on every attached pod interface our
        program in both directions, current and first in the chain. Each repair is
        logged and counted (self.repairs, by kind); returns what was repaired."""
        dp = self.datapath
        done: list[str] = []

        def repaired(kind: str, what: str) -> None:
            self.repairs[kind] += 1
            done.append(what)
            log.warning("repaired: %s", what)

        broken = dp.mirror_port_problems()
        if broken:
            dp.setup_mirror_port()
            if self.writer is not None:
                self.writer.set_mirror_port(dp.mirror_tx_index)
            repaired("mirror_port", "mirror port: " + "; ".join(broken))
        dp.tcx_links()  # unpins links whose device is gone
        present = dp.link_indexes()
        unrepairable: dict[str, str] = {}
        for idx, key in list(self.attached.items()):
            if idx not in present:
                continue  # gone: the next apply detaches it
            name = key or f"ifindex {idx}"
            for st in dp.hook_states(idx):
                if not st.problem:
                    continue
                what = f"{name} {st.direction}: {st.problem}"
                try:
                    if st.position > 1 and dp.mode() == "legacy":
                        # Behind tcx programs: only a tcx link of ours could go first.
                        unrepairable[what] = "the legacy hook runs after tcx programs"
                        continue
                    if st.position > 1:
                        dp.move_to_head(idx, st.direction)
                        repaired("position", what)
                    else:
                        dp.attach_index(idx, key)
                        repaired("missing" if not st.position else "program", what)
                except DatapathError as e:
                    unrepairable[what] = str(e)
        for what, why in unrepairable.items():
            if self._unrepairable.get(what) != why:
                log.warning("cannot repair %s: %s", what, why)
        self._unrepairable = unrepairable
        return done

    def attachment_report(self) -> dict:
        """How pod interfaces are attached, and the repairs made (status.json)."""
        return {"mode": self.datapath.mode(), "pod_side": self.datapath.pod_side,
                "repairs": dict(self.repairs),
                "unrepaired": dict(self._unrepairable)}

    def collect(self):
        """Prometheus families (agent/metrics.py's Collector protocol)."""
        from .metrics import Family

        fam = Family("cn2mirror_attachment_repairs_total", "counter",
                     "Attachments the resync found missing, stale or not first and "
                     "repaired, by kind (missing, program, position, mirror_port).")
        for kind in ("missing", "program", "position", "mirror_port"):
            fam.add(self.repairs.get(kind, 0), {"kind": kind})
        yield fam
        yield Family("cn2mirror_attachment_mode", "gauge",
                     "How pod interfaces are attached (1 for the mode in use).").add(
            1, {"mode": self.datapath.mode()})

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
