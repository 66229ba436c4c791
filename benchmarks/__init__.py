"""cn2mirror benchmarks: ``python -m benchmarks.run`` (``make bench``).

Every figure is a ratio to a baseline measured in the same run, interleaved with it:
the machines this runs on are shared and noisy, so absolute numbers are noted but only
ratios (and differences to a same-run baseline) are compared with targets.
"""
