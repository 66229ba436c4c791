"""Turning what the maps hold (address words, MACs, modes, bitmaps, per-CPU counters)
into the values ``show`` prints."""

from __future__ import annotations

import ipaddress

from cn2mirror.agent import layout as L
from cn2mirror.agent.pinned import COUNTER_FIELDS, CounterTotals


def address(words, family: int | None) -> str | None:
    raw = bytes(words)
    if raw == bytes(16):
        return None
    if family == L.FAMILY_V4 or (family is None and raw[4:] == bytes(12)):
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def mac(raw) -> str | None:
    b = bytes(raw)
    return None if b == bytes(6) else ":".join(f"{x:02x}" for x in b)


def mode_name(mode: int) -> str:
    try:
        return L.Mode(mode).name.lower()
    except ValueError:
        return f"mode{mode}"


def bit_slots(words) -> list[int]:
    out = []
    for w, v in enumerate(words):
        v = int(v)
        while v:
            low = v & -v
            out.append(w * 64 + low.bit_length() - 1)
            v ^= low
    return out


def counters_json(t: CounterTotals) -> dict:
    d = t.as_dict()
    d["dropped"] = sum(d["drops"].values())
    return d


def nonzero(t: CounterTotals) -> bool:
    return any((*(getattr(t, f) for f in COUNTER_FIELDS), *(t.drops or {}).values()))
