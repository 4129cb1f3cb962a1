"""The performance model: decoded tokens per second on a device profile, from what one token
computes on and reads. One formula for both of its users: `edgemoe profile`
(edgemoe.devices.model_profile: cache misses per token from a routing trace, every miss one read
of a whole expert) and `edgemoe bench` (edgemoe.devices.bench: the run's own routing replayed
through the expert cache, edgemoe.devices.replay.replay_run). Nothing in it is fitted to a
measured run.

Per decoded token:

    t_compute = compute_bytes / memory_bandwidth
    t_io      = read_bytes / seq_read_bw + reads x read_latency
    tokens/s  = 1 / max(t_compute, t_io)

- compute_bytes: the weight bytes the token computes on (the dense weights it reads and its
  experts' bytes at the widths they run at): decode reads every weight once per token, so compute
  is taken as memory-bound;
- read_bytes, reads: what the expert cache reads from the store for the token; a read is one run
  of planes of one expert (one preadv, an expert or part of one: a few MiB for a full-width expert
  of a 7B MoE);
- memory_bandwidth = memory_bandwidth_gbps, seq_read_bw = storage.seq_read_mbps, read_latency =
  storage.read_latency_us.

The max, not the sum: a background reader thread reads expert planes while the kernels compute
(edgemoe.runtime.pipeline), so the slower of the two sets the pace. A read costs one positioning
(read_latency) and then transfers at the sequential rate: the reads are runs of planes of MiB,
and storage.rand_read_mbps (1 MiB reads at random offsets) already holds one positioning per MiB,
which read_latency would count a second time. docs/profiles.md ("The prediction formula") gives
the measurements this was chosen on. It ignores attention's KV reads, kernel efficiency below the
bandwidth bound and the transcoding of experts as they enter the cache.
"""

from __future__ import annotations

import math

from .profiles import Profile


def predict(prof: Profile, compute_bytes: float, read_bytes: float, reads: float) -> dict:
    """Decode speed on `prof` from one token's compute bytes, bytes read and reads (module doc):
    t_compute and t_io in seconds per token, tokens_per_s, the bound ("memory" or "storage") and
    read_mb_per_token."""
    t_compute = compute_bytes / (prof.memory_bandwidth_gbps * 1e9)
    t_io = read_bytes / (prof.storage.seq_read_mbps * 1e6) + reads * prof.storage.read_latency_us * 1e-6
    t = max(t_compute, t_io)
    return dict(
        t_compute=t_compute,
        t_io=t_io,
        tokens_per_s=1 / t if t > 0 else math.inf,
        bound="storage" if t_io > t_compute else "memory",
        read_mb_per_token=read_bytes / 1e6,
    )
