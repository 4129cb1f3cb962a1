#!/usr/bin/env python3
"""Budgets from the minimum to the whole model: edgemoe against llama.cpp under the same memory cap.

A thin front for `edgemoe bench` (edgemoe/devices/bench.py) with budgets 100%, 50% and 30% of the GGUF by
default, this machine's storage unthrottled unless --throttle is given:

    python tools/bench_budget.py MODEL.gguf [--profile emmc-sbc-4gb] [--budgets 1,0.5,0.3] [--throttle]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgemoe.devices.bench import main as bench  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--profile" not in args:
        args += ["--profile", "emmc-sbc-4gb"]
    if "--budgets" not in args:
        args += ["--budgets", "1,0.5,0.3"]
    if "--throttle" in args:
        args.remove("--throttle")
    else:
        args.append("--no-throttle")
    raise SystemExit(bench(args))
