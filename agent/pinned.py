"""Reading a node's pinned maps from any process (CLI, metrics), without compiling.

Every map of layout.map_specs() is pinned as <pin root>/<name>. The CLI's `show`
commands and the agent's /metrics read them through here, so they work while the agent
runs and after it has died.
"""

from __future__ import annotations

import ctypes as C
import os
from collections.abc import Iterator
from dataclasses import dataclass

from . import layout as L
from .bpfsys import BpfMap, map_info

COUNTER_FIELDS = ("cloned", "packets", "bytes", "truncated", "fragmented", "gso_wrapped",
                  "gso_by_segment", "sampled_out")


class NotPinned(FileNotFoundError):
    """Nothing (or not everything) is pinned under the pin root."""


@dataclass
class CounterTotals:
    cloned: int = 0
    packets: int = 0
    bytes: int = 0
    truncated: int = 0
    fragmented: int = 0  # copies sent whole, in outer IPv4 fragments
    gso_wrapped: int = 0  # super-packets wrapped once (their segments are in packets)
    gso_by_segment: int = 0  # super-packets segmented first, wrapped one by one
    sampled_out: int = 0  # copies not made by the destination's sampling (issue 15)
    drops: dict[str, int] | None = None

    def as_dict(self) -> dict:
        return {"cloned": self.cloned, "packets": self.packets, "bytes": self.bytes,
                "truncated": self.truncated, "fragmented": self.fragmented,
                "gso_wrapped": self.gso_wrapped, "gso_by_segment": self.gso_by_segment,
                "sampled_out": self.sampled_out, "drops": dict(self.drops or {})}


@dataclass
class FlowTableTotals:
    capacity: int  # entries the flow table can hold
    entries: int  # flows in it now
    created: int  # flow entries the classifier created
    evicted: int  # entries the table (an LRU hash) evicted to make room: created - entries

    def as_dict(self) -> dict:
        return {"capacity": self.capacity, "entries": self.entries, "created": self.created,
                "evicted": self.evicted}


def sum_counters(per_cpu: list[bytes]) -> CounterTotals:
    """Add up one slot's per-CPU Counters."""
    t = CounterTotals(drops={d.name.lower(): 0 for d in L.Drop})
    for raw in per_cpu:
        c = L.Counters.from_buffer_copy(raw)
        for f in COUNTER_FIELDS:
            setattr(t, f, getattr(t, f) + getattr(c, f))
        for d in L.Drop:
            t.drops[d.name.lower()] += c.drops[d]
    return t


class PinnedMaps:
    """Read access to the maps pinned under `pin_root`."""

    def __init__(self, pin_root: str, max_flow_dests: int | None = None):
        self.pin_root = pin_root.rstrip("/")
        if not os.path.isdir(self.pin_root):
            raise NotPinned(f"no pin root at {self.pin_root}: is the agent running, and "
                            "is --pin-root the agent's?")
        self._maps: dict[str, BpfMap] = {}
        flows_path = f"{self.pin_root}/flows"
        if not os.path.exists(flows_path):
            raise NotPinned(f"nothing of cn2mirror is pinned under {self.pin_root}")
        self.max_flow_dests = max_flow_dests or self._flow_dests_from_pin(flows_path)
        self.specs = {s.name: s for s in L.map_specs(self.max_flow_dests)}

    @staticmethod
    def _flow_dests_from_pin(path: str) -> int:
        """The flow entry's size tells how many destinations a flow holds."""
        from .bpfsys import obj_get

        fd = obj_get(path)
        try:
            info = map_info(fd)
        finally:
            os.close(fd)
        fixed = C.sizeof(L.FlowEntry) - 4 * L.DEFAULT_MAX_FLOW_DESTS
        return max(1, (info.value_size - fixed) // 4)

    def map(self, name: str) -> BpfMap:
        if name not in self._maps:
            spec = self.specs[name]
            path = f"{self.pin_root}/{name}"
            try:
                m = BpfMap.pinned(path, C.sizeof(spec.key), C.sizeof(spec.value),
                                  percpu=spec.kind.startswith("percpu"))
            except FileNotFoundError as e:
                raise NotPinned(f"map {name} is not pinned at {path}") from e
            info = map_info(m.fd)
            if (info.key_size, info.value_size) != (m.key_size, m.value_size):
                os.close(m.fd)
                raise NotPinned(f"map {name} at {path} has key/value sizes "
                                f"{info.key_size}/{info.value_size}, this cn2mirror expects "
                                f"{m.key_size}/{m.value_size}: pinned by another version?")
            self._maps[name] = m
        return self._maps[name]

    # ---------------------------------------------------------------- typed reads
    def config(self) -> L.Config:
        return L.Config.from_buffer_copy(self.map("config").lookup(bytes(4)))

    def counters(self, kind: str, slot: int) -> CounterTotals:
        """kind: rule, iface, dest or node."""
        raw = self.map(f"stats_{kind}").lookup(int(slot).to_bytes(4, "little"))
        return sum_counters(raw or [])

    def interfaces(self) -> Iterator[tuple[int, L.InterfaceEntry]]:
        for k, v in self.map("interfaces").items():
            yield int.from_bytes(k, "little"), L.InterfaceEntry.from_buffer_copy(v)

    def rules(self) -> Iterator[tuple[int, L.RuleEntry]]:
        zero = bytes(C.sizeof(L.RuleEntry))
        for k, v in self.map("rules").items():
            if v != zero:
                yield int.from_bytes(k, "little"), L.RuleEntry.from_buffer_copy(v)

    def rule_sampling(self) -> dict[int, L.RuleSampling]:
        """Rule slot -> its own sampling (rules without one are absent). Empty when the
        pins predate the map (an agent older than per-rule sampling)."""
        zero = bytes(C.sizeof(L.RuleSampling))
        try:
            items = self.map("rule_sampling").items()
            return {int.from_bytes(k, "little"): L.RuleSampling.from_buffer_copy(v)
                    for k, v in items if v != zero}
        except NotPinned:
            return {}

    def destinations(self) -> Iterator[tuple[int, L.DestEntry]]:
        zero = bytes(C.sizeof(L.DestEntry))
        for k, v in self.map("destinations").items():
            if v != zero:
                yield int.from_bytes(k, "little"), L.DestEntry.from_buffer_copy(v)

    def flows(self) -> Iterator[tuple[L.FlowKey, C.Structure]]:
        entry = self.specs["flows"].value
        for k, v in self.map("flows").items():
            yield L.FlowKey.from_buffer_copy(k), entry.from_buffer_copy(v)

    def flow_table(self) -> FlowTableTotals:
        """The flow table's size, its entries, and the entries it evicted. Only the LRU
        removes entries (see layout.FlowTableStats), so evicted = created - present:
        exact when no flow starts while the table is read, otherwise off by those."""
        flows = self.map("flows")
        per_cpu = self.map("flow_table_stats").lookup(bytes(4)) or []
        created = sum(L.FlowTableStats.from_buffer_copy(raw).created for raw in per_cpu)
        present = flows.count()
        return FlowTableTotals(capacity=map_info(flows.fd).max_entries, entries=present,
                               created=created, evicted=max(0, created - present))

    def close(self) -> None:
        for m in self._maps.values():
            os.close(m.fd)
        self._maps.clear()
