"""Time `edgemoe convert` on a model: seconds, MB/s of the source's expert bytes, peak RSS.

Each conversion runs in a fresh process (python -m edgemoe convert) writing into a temporary
directory beside the store cache (removed after), from a cold page cache when --cold (needs root:
drop_caches), with EDGEMOE_THREADS=threads.

    python tools/bench_convert.py MODEL.gguf [--scheme native] [--threads 1,2] [--cold]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgemoe.models.config import ModelArgs  # noqa: E402
from edgemoe.models.gguf_file import GGUFFile  # noqa: E402
from edgemoe.store.convert import source_expert_bytes  # noqa: E402


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--scheme", default=None, help="as edgemoe convert --scheme (default: its own choice)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--cold", action="store_true")
    args = ap.parse_args(argv)
    gf = GGUFFile(args.model)
    c = ModelArgs.from_gguf(gf)
    n_moe = sum(not c.is_dense(i) for i in range(c.n_layer))
    src = source_expert_bytes(gf, c) * c.n_expert * n_moe
    gf.close()
    print(f"{args.model.name}: {src / 1e6:.0f} MB of experts in {n_moe} layers x {c.n_expert}")
    for th in (int(t) for t in args.threads.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.model.parent))
        try:
            if args.cold:
                _drop_caches()
            cmd = [sys.executable, "-m", "edgemoe", "convert", str(args.model), "-o", str(tmp / "s.edgemoe")]
            if args.scheme:
                cmd += ["--scheme", args.scheme]
            t0 = time.perf_counter()
            p = subprocess.run(
                ["/usr/bin/time", "-f", "%M", *cmd],
                env={**os.environ, "EDGEMOE_THREADS": str(th)},
                capture_output=True,
                text=True,
            )
            dt = time.perf_counter() - t0
            if p.returncode:
                print(p.stderr[-2000:])
                return 1
            peak = int(p.stderr.strip().splitlines()[-1]) * 1024
            print(
                f"threads {th}: {dt:.1f} s, {src / dt / 1e6:.0f} MB/s of source experts, peak RSS "
                f"{peak / 2**20:.0f} MiB{' (cold page cache)' if args.cold else ''}",
                flush=True,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
