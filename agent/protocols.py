"""The one table of IP protocols cn2mirror names: numbers, and how each is spelt.

``name`` is the spelling of the command line and JSON output (tshark's); ``api_name``
the one CN2 and NetworkPolicy objects use (None: objects cannot name it). The order is
the order of the CRDs' protocol enum (agent/model.py PROTOCOLS).
"""

from __future__ import annotations

from typing import NamedTuple


class Protocol(NamedTuple):
    name: str
    api_name: str | None


BY_NUMBER: dict[int, Protocol] = {
    6: Protocol("tcp", "TCP"),
    17: Protocol("udp", "UDP"),
    132: Protocol("sctp", "SCTP"),
    1: Protocol("icmp", "ICMP"),
    58: Protocol("icmpv6", "ICMPv6"),
    136: Protocol("udplite", None),
}
NUMBERS = {p.name: n for n, p in BY_NUMBER.items()}  # "tcp" -> 6
API_NUMBERS = {p.api_name: n for n, p in BY_NUMBER.items() if p.api_name}  # "TCP" -> 6

TCP, UDP, SCTP, ICMP, ICMPV6 = 6, 17, 132, 1, 58
WITH_PORTS = (TCP, UDP, SCTP)  # rules can restrict their ports
ICMPS = (ICMP, ICMPV6)  # no ports; in the flow key, an echo's identifier stands in both


def name(number: int) -> str:
    """"tcp", or the number itself when the table has no name for it."""
    p = BY_NUMBER.get(number)
    return p.name if p else str(number)


def api_name(number: int) -> str:
    """"TCP" (the objects' spelling), or the number itself."""
    p = BY_NUMBER.get(number)
    return p.api_name or p.name if p else str(number)


def number(text: str) -> int | None:
    """6 for "tcp", "TCP" or "6"; None for what is neither a known name nor 0-255."""
    if text.isdigit():
        n = int(text)
        return n if 0 <= n <= 255 else None
    return NUMBERS.get(text.lower())


def endpoint_text(address: str, port: int | None) -> str:
    """"198.18.1.2:80", "[fd00::2]:80", or the address alone when there is no port."""
    if port is None:
        return address
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def flow_text(src: str, sport: int | None, dst: str, dport: int | None, *,
              protocol: int | None = None, arrow: str = "->", detail: str = "") -> str:
    """One flow in one line, the way every command writes it: "TCP 198.18.1.3:40000 ->
    198.18.1.2:80" (``protocol`` given: its objects' spelling first), "a <-> b" (both
    directions of a flow entry), with ``detail`` last ("echo request", "id 7")."""
    text = f"{endpoint_text(src, sport)} {arrow} {endpoint_text(dst, dport)}"
    if protocol is not None:
        text = f"{api_name(protocol)} {text}"
    return f"{text} {detail}" if detail else text
