"""`make bench`: run the benchmarks and write benchmarks/results/.

    python -m benchmarks.run                  # the full run (about 5 minutes + control plane)
    python -m benchmarks.run --quick          # a tiny run of the harness (smoke test)
    python -m benchmarks.run --only percpu,tcp --out /tmp/bench

Writes <out>/results.json (everything), one JSON per benchmark, results.md (the table)
and PNG plots. Every figure is a ratio to a baseline measured in the same run. Needs
root, bcc (make setup), trafgen, iperf3, nft, iptables, tc; sockperf is used when
installed. Each benchmark builds and removes its own namespace lab; a benchmark that
fails is recorded with its error and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from . import common as cm

BENCHMARKS = ("percpu", "throughput", "tcp", "copy_cost", "control_plane")
TOOLS = {"percpu": ("bpftool",), "throughput": ("trafgen", "nft", "iptables", "tc"),
         "tcp": ("iperf3",), "copy_cost": ("iperf3", "perf", "tc"), "control_plane": ()}


def _module(name: str):
    return importlib.import_module({"percpu": "benchmarks.percpu_cost",
                                    "throughput": "benchmarks.throughput",
                                    "tcp": "benchmarks.tcp_latency",
                                    "copy_cost": "benchmarks.copy_cost",
                                    "control_plane": "benchmarks.control_plane"}[name])


def _call(fn, quick: bool, log):
    """Call a benchmark's run() with the arguments it takes (quick, log)."""
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "quick" in params:
        kwargs["quick"] = quick
    if "log" in params:
        kwargs["log"] = log
    return fn(**kwargs)


def run_benchmark(name: str, quick: bool, log) -> dict:
    if name == "control_plane":
        # Owned by another module; run only when it is there.
        if not (Path(__file__).parent / "control_plane.py").exists():
            return {"skipped": "benchmarks/control_plane.py is not present"}
    missing = [t for t in TOOLS[name] if not shutil.which(t)]
    if missing:
        return {"skipped": f"missing tools: {', '.join(missing)} (run make setup)"}
    mod = _module(name)
    fn = getattr(mod, "run", None) or getattr(mod, "main", None)
    if fn is None:
        return {"skipped": f"{mod.__name__} has no run()"}
    t0 = time.time()
    res = _call(fn, quick, log)
    if not isinstance(res, dict):
        res = {"result": res}
    res.setdefault("elapsed_s", round(time.time() - t0, 1))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny run (the smoke test)")
    ap.add_argument("--out", default=str(cm.RESULTS_DIR), help="results directory")
    ap.add_argument("--only", default=",".join(BENCHMARKS),
                    help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks need root (network namespaces, BPF)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: dict = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                     "quick": args.quick, "machine": cm.machine(), "benchmarks": {}}
    t0 = time.time()
    failed = False
    with cm.sigterm_as_exit():
        for name in names:
            log(f"== {name}")
            try:
                res = run_benchmark(name, args.quick, log)
            except Exception as e:  # recorded; the other benchmarks still run
                failed = True
                res = {"error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()}
                log(f"  {name} failed: {e}")
            if "skipped" in res:
                log(f"  skipped: {res['skipped']}")
            results["benchmarks"][name] = res
            if "error" not in res and "skipped" not in res:
                # (a failed run leaves the previous good file of that benchmark alone)
                (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str)
                                                  + "\n")
    results["elapsed_s"] = round(time.time() - t0, 1)
    results["machine"]["cpu_busy_end"] = round(cm.cpu_busy(), 3)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")

    from . import report

    md = report.write(results, out, plots=not args.no_plots)
    log(f"== wrote {out}/results.json, {md.name}" + ("" if args.no_plots else " and plots")
        + f" in {results['elapsed_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
