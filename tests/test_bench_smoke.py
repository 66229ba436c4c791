"""Smoke run of the benchmark harness (`python -m benchmarks.run --quick`, well under a
minute): it must produce well-formed results with sane values, and leave nothing behind.
The real run (`make bench`) is not part of `make test`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.bpf, pytest.mark.netns]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable"
    if not os.path.exists(f"/lib/modules/{os.uname().release}/build"):
        return "no kernel headers for bcc"
    for tool in ("trafgen", "iperf3", "nft", "tc", "bpftool"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


def _finite_positive(v) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    why = _missing()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out),
                        "--only", "percpu,throughput,tcp"], cwd=REPO, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, f"bench failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return out, json.loads((out / "results.json").read_text())


def test_files_written(quick_run):
    out, res = quick_run
    for name in ("results.json", "results.md", "percpu.json", "throughput.json", "tcp.json"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "## Targets" in md and "| target | measured | met |" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for png in ("percpu.png", "throughput.png", "tcp.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert res["quick"] is True
    assert set(res["benchmarks"]) == {"percpu", "throughput", "tcp"}
    for name, b in res["benchmarks"].items():
        assert "error" not in b and "skipped" not in b, (name, b)


def test_per_packet_costs(quick_run):
    pc = quick_run[1]["benchmarks"]["percpu"]
    assert pc["by_rules"], "no rule counts measured"
    for row in pc["by_rules"]:
        for case in ("udp4_nomatch", "udp6_nomatch", "udp4_copy", "udp6_copy"):
            e = row["established"][case]
            assert _finite_positive(e["floor_ns"]["median"])
            assert _finite_positive(e["ratio"]["median"]) and e["ratio"]["median"] > 1
            # the established-flow cost is measured, and it is not the first packet's
            assert 0 < e["over_floor_ns"]["median"] < 100_000
        for regime in ("first_packet", "first_packet_full"):
            for case in ("syn4", "syn6", "udp4_nomatch"):
                assert _finite_positive(row[regime][case]["over_floor_ns"]["median"])
        est = row["established"]["udp4_nomatch"]["over_floor_ns"]["median"]
        assert row["first_packet"]["syn4"]["over_floor_ns"]["median"] > est
        assert row["established"]["udp4_copy"]["over_floor_ns"]["median"] > est
        cp = row["copies"]
        assert cp["cloned"] == cp["expected"] > 0
        assert cp["delivered_to_analyzer"] >= 0.99 * cp["cloned"]
        # every first packet made a flow (the pod's own stray packets, e.g. IPv6 router
        # solicitations through the attached classifier, may add a few)
        made = row["flow_table"]["after"] - row["flow_table"]["before"]
        assert row["flow_table"]["new_flows_run"] <= made <= row["flow_table"]["new_flows_run"] + 20
    blocks = pc["blocks"]
    assert _finite_positive(blocks["bb_flow_insert"]["over_floor_ns"]["median"])


def test_throughput_ratios(quick_run):
    s = quick_run[1]["benchmarks"]["throughput"]["summary"]
    assert s["none"]["prod_ratio"]["median"] == pytest.approx(1.0)
    for name in ("none", "cn2m_nomatch", "cn2m_flow_all"):
        assert _finite_positive(s[name]["prod_pps"]["median"]), name
        assert 0 < s[name]["prod_ratio"]["median"] < 5, name
        assert _finite_positive(s[name]["cpu_ns_per_packet"]["median"]), name
    assert s["cn2m_nomatch"]["copies_per_prod"]["median"] == 0
    assert 0.9 < s["cn2m_flow_all"]["copies_per_prod"]["median"] < 1.1
    acc = s["cn2m_flow_all"]["accounting"]
    assert acc["cloned"] > 0 and acc["delivered"] > 0
    assert acc["cloned"] >= acc["sent"]


def test_tcp(quick_run):
    s = quick_run[1]["benchmarks"]["tcp"]["summary"]
    assert _finite_positive(s["bulk_gbps_off"]["median"])
    assert _finite_positive(s["bulk_gbps_on"]["median"])
    assert _finite_positive(s["bulk_ratio"]["median"])
    assert _finite_positive(s["pingpong_median_us_off"]["median"])
    assert _finite_positive(s["pingpong_median_us_on"]["median"])
    assert s["bulk_copies"]["cloned"] > 0 and s["bulk_copies"]["delivered"] > 0
    # Side by side: every scenario measured; the copies carry the whole byte stream.
    side = s["side_by_side"]
    assert set(side) == {"off", "cn2m", "tc_mirred", "nft_dup"}
    assert all(_finite_positive(e["bulk_ratio"]["median"]) for e in side.values())
    assert side["cn2m"]["recoverable"]["share"] > 0.99


def test_nothing_left_behind(quick_run):
    res = quick_run[1]
    prefixes = [b["lab_prefix"] for b in res["benchmarks"].values()]
    assert len(prefixes) == 3
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for p in prefixes:
        assert p not in netns, f"namespace of {p} left behind"
        assert not any(n.startswith(p) for n in os.listdir("/sys/fs/bpf")), f"pins of {p}"


def test_copy_cost_categories():
    """The copy-cost profile puts a sample where its call chain says (leaf first)."""
    from benchmarks.copy_cost import categorize

    assert categorize(["csum_partial", "skb_segment", "tcp_gso_segment", "validate_xmit_skb",
                       "bpf_clone_redirect", "bpf_prog_x_classify_to_pod",
                       "tcp_sendmsg"]).startswith("copy: segmenting")
    assert categorize(["veth_xmit", "dev_hard_start_xmit", "bpf_clone_redirect"]) == \
        "copy: veth transmit of the copies"
    assert categorize(["nft_do_chain", "nft_do_chain_netdev", "__netif_receive_skb_core",
                       "process_backlog", "tcp_sendmsg"]).startswith("copy: the analyzer")
    assert categorize(["_copy_from_iter", "tcp_sendmsg"]) == "production: sender's data copy"
    assert categorize(["tcf_mirred_act", "tcp_sendmsg"]).startswith("copy: tc mirred")
