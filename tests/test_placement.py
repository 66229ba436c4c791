"""One owner per host interface (agent/node.py): pure Python, no namespaces."""

from __future__ import annotations

import itertools

from cn2mirror.agent.discovery import Placement
from cn2mirror.agent.node import one_owner_per_interface


def test_the_proven_owner_keeps_an_interface_and_the_conflict_is_said_on_both():
    # Before: interfaces were keyed by ifindex, so a claim on web's veth replaced web's
    # entry, whichever came last.
    web = Placement(7, "vweb", "route to 198.18.1.2", True)
    claim = Placement(7, "vweb", "explicit", False)
    other = Placement(9, "vdb", "route to 198.18.1.4", True)
    placed = {"evil/a/eth0": claim, "demo/web/eth0": web, "demo/db/eth0": other}
    for order in itertools.permutations(placed):
        problems: dict[str, str] = {}
        kept = one_owner_per_interface({k: placed[k] for k in order}, problems)
        assert kept == {"demo/web/eth0": web, "demo/db/eth0": other}
        assert problems == {
            "Interface demo/web/eth0": "keeps vweb (route to 198.18.1.2); also claimed by "
                                       "evil/a/eth0",
            "Interface evil/a/eth0": "vweb (explicit) belongs to demo/web/eth0 (route to "
                                     "198.18.1.2): not attached",
        }


def test_between_equal_claims_the_first_key_keeps_it_every_time():
    a = Placement(7, "vx", "explicit", False)
    b = Placement(7, "vx", "explicit", False)
    for placed in ({"ns/b/eth0": b, "ns/a/eth0": a}, {"ns/a/eth0": a, "ns/b/eth0": b}):
        problems: dict[str, str] = {}
        assert list(one_owner_per_interface(placed, problems)) == ["ns/a/eth0"]
        assert problems["Interface ns/b/eth0"] == \
            "vx (explicit) belongs to ns/a/eth0 (explicit, claimed first): not attached"
