"""`edgemoe profile -m MODEL`: profile a model's routing on this device: its sizes, the routing
trace's statistics, the performance model's predictions (edgemoe.devices.perf_model) and the
recommended budget, width and cache size; writes report.md (edgemoe.devices.report) with plots."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..errors import EdgeMoEError
from .cachesim import hit_rates, popularity, reuse
from .measure import MiB, measure_device, profile_yaml
from .perf_model import predict
from .profiles import Profile, find_profile, load_profile, parse_profile, read_profile
from .report import report_markdown, write_plots


@dataclass
class ModelFacts:
    name: str
    n_layer: int
    n_moe_layers: int
    n_expert: int
    top_k: int
    widths: tuple[int, ...]
    expert_bytes: dict  # width (int) -> bytes of one expert at that nested width; "source" -> as in the GGUF
    dense_bytes: int  # resident non-expert weights
    dense_touched: int  # non-expert weight bytes read per token (token_embd: one row)
    kv_bytes: int
    notes: list = field(default_factory=list)


def model_facts(path: Path, model) -> ModelFacts:
    """Sizes of a loaded model: expert bytes per nested width, dense bytes, KV cache."""
    from ..models.gguf_file import GGUFFile
    from ..store.convert import expert_bytes_by_width, plan_scheme, source_bits, source_expert_bytes
    from ..store.reader import DENSE, StoreReader, is_store

    c = model.config
    notes = []
    if is_store(path):
        r = StoreReader(path)
        pf = r.manifest["scheme"]["planes_for"]
        eb = {int(b): r.expert_bytes(int(pf[str(b)])) for b in r.bits}
        widths = tuple(r.bits)
        gf = GGUFFile(Path(path) / DENSE)
        r.close()
    else:
        gf = GGUFFile(path)
        src_expert = source_expert_bytes(gf, c)
        sbits = source_bits(gf, c)
        sch = plan_scheme(gf, c, Path(path), sbits, None, None)  # what `edgemoe convert` would write
        eb = expert_bytes_by_width(sch, c)
        widths = tuple(eb)
        eb["source"] = src_expert
    tensors = gf.tensors
    dense = sum(t.nbytes for n, t in tensors.items() if not n.endswith("_exps.weight"))
    emb = tensors.get("token_embd.weight")
    touched = dense - (emb.nbytes - emb.nbytes // max(c.n_vocab, 1) if emb is not None else 0)
    if "output.weight" not in tensors and emb is not None:  # tied output: the whole matrix is read
        touched += emb.nbytes - emb.nbytes // max(c.n_vocab, 1)
    kv = model.stats().kv_bytes
    n_moe = c.n_layer - c.n_leading_dense
    gf.close()
    return ModelFacts(
        name=path.name,
        n_layer=c.n_layer,
        n_moe_layers=n_moe,
        n_expert=c.n_expert,
        top_k=c.n_expert_used,
        widths=tuple(int(w) for w in widths),
        expert_bytes=eb,
        dense_bytes=dense,
        dense_touched=touched,
        kv_bytes=kv,
        notes=notes,
    )


def runtime_bytes() -> int:
    from ..runtime.budget import RUNTIME_ESTIMATE, SAFETY_BYTES

    return RUNTIME_ESTIMATE + SAFETY_BYTES


def _slot_grid(n_total: int, top_k: int, n_moe: int) -> list[int]:
    lo = max(top_k, 1)
    grid = {lo, n_total}
    for f in (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9):
        grid.add(max(lo, int(round(f * n_total))))
    for m in (1, 2, 4):  # multiples of one token's experts (the locality paper's ~2x sweet spot)
        grid.add(min(n_total, max(lo, m * top_k * n_moe)))
    return sorted(grid)


def _predictions(
    facts: ModelFacts, rows: list[dict], experts_per_token: float, fixed: int, prof: Profile
) -> list[dict]:
    """Predictions (perf_model.predict): every width x cache size, each marked whether it fits the
    device's default budget. A miss reads one whole expert at the width."""
    from ..runtime.cache import POLICIES

    budget = prof.default_budget
    preds = []
    for b in facts.widths:
        eb = facts.expert_bytes[b]
        for r in rows:
            best = min(POLICIES, key=lambda p: (r[p + "_warm"], r[p]))
            need = fixed + r["slots"] * eb
            misses = r[best + "_warm"] / r["warm_tokens"]
            p = predict(prof, facts.dense_touched + experts_per_token * eb, misses * eb, misses)
            preds.append(dict(bits=b, slots=r["slots"], policy=best, budget=need, fits=need <= budget, **p))
    return preds


def profile_model(
    model_path: str | os.PathLike,
    text_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokens: int = 256,
    device: str | os.PathLike | None = None,
    device_measured: dict | None = None,
    plots: bool = True,
    trace_path: str | os.PathLike | None = None,
) -> dict:
    """Routing trace -> popularity, reuse, hit rates, recommendation; writes out_dir/report.md (+ PNGs)."""
    import edgemoe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = ""
    if trace_path is None:
        try:
            text = Path(text_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EdgeMoEError(f"{text_path}: cannot read text file ({exc})") from None
    prof, prof_src = _device_profile(device, device_measured)
    t0 = time.perf_counter()
    with edgemoe.load(model_path, n_ctx=tokens + 8) as m:
        if trace_path is not None:  # a saved trace (trace.npy of an earlier report): no decoding
            trace = np.load(trace_path)
            if trace.ndim != 3 or trace.shape[1] != m.config.n_layer or trace.shape[0] < 2:
                raise EdgeMoEError(f"{trace_path}: not a [tokens, {m.config.n_layer}, top_k] trace of this model")
        else:
            ids = m.tokenize(text)[:tokens]
            if len(ids) < 2:
                raise EdgeMoEError(f"{text_path}: needs at least 2 tokens, has {len(ids)}")
            trace = np.asarray(m.routing_trace(ids))
        facts = model_facts(Path(m.path), m)
        kv_full = facts.kv_bytes  # at n_ctx = tokens + 8
        ctx_for_budget = min(4096, m.config.n_ctx_train)
        kv_full = int(kv_full / m.n_ctx * ctx_for_budget)
    trace_s = time.perf_counter() - t0
    T, L, K = trace.shape
    moe_layers = [l for l in range(L) if (trace[:, l] >= 0).any()]
    n_moe = len(moe_layers)
    n_total = n_moe * facts.n_expert
    pop = popularity(trace, facts.n_expert)
    reu = reuse(trace, facts.n_expert)
    slots = _slot_grid(n_total, K, n_moe)
    rows = hit_rates(trace, facts.n_expert, slots)
    experts_per_token = rows[0]["requests"] / T
    fixed = facts.dense_bytes + kv_full + runtime_bytes()
    preds = _predictions(facts, rows, experts_per_token, fixed, prof)
    rec = recommend(preds, facts.widths)
    lossy = lossy_option(preds, facts.widths, rec)
    result = dict(
        trace_shape=[T, L, K],
        trace_seconds=trace_s,
        trace_path=trace_path,
        facts=facts,
        popularity=pop,
        reuse=reu,
        hit_rows=rows,
        predictions=preds,
        recommendation=rec,
        lossy_option=lossy,
        profile=prof,
        profile_source=prof_src,
        experts_per_token=experts_per_token,
        fixed_bytes=fixed,
        kv_bytes_at_ctx=kv_full,
        ctx_for_budget=ctx_for_budget,
        plots=[],
    )
    if plots:
        result["plots"] = write_plots(result, out_dir)
    (out_dir / "report.md").write_text(report_markdown(result, model_path, text_path), encoding="utf-8")
    np.save(out_dir / "trace.npy", trace)
    return result


def _best_per_width(preds: list[dict], widths) -> dict:
    """Per width, among predictions that fit the budget: the smallest cache within 95% of that
    width's fastest fitting cache."""
    per_width = {}
    for b in widths:
        ps = sorted((p for p in preds if p["fits"] and p["bits"] == b), key=lambda p: p["slots"])
        if ps:
            top = max(p["tokens_per_s"] for p in ps)
            per_width[b] = next(p for p in ps if p["tokens_per_s"] >= 0.95 * top)
    return per_width


def recommend(preds: list[dict], widths) -> dict | None:
    """Lossless: the top width (every plane, what quality max reads) at the smallest cache
    predicted within 95% of its fastest cache that fits the budget; None when none fits."""
    return _best_per_width(preds, widths).get(max(widths))


def lossy_option(preds: list[dict], widths, rec: dict | None) -> dict | None:
    """An opt-in, lossy alternative to `rec`: when the top width's best configuration is
    storage-bound (or none fits), the widest narrower width predicted within 90% of the fastest
    width and faster than `rec` (fewer bits per miss); None when fewer bits would not help."""
    per_width = _best_per_width(preds, widths)
    if rec is not None and rec["bound"] == "memory":
        return None  # the nested kernels do not run at memory bandwidth today: no gain counted
    narrower = {b: p for b, p in per_width.items() if b < max(widths)}
    if not narrower:
        return None
    fastest = max(p["tokens_per_s"] for p in per_width.values())
    for b in sorted(narrower, reverse=True):
        p = narrower[b]
        if p["tokens_per_s"] >= 0.9 * fastest and (rec is None or p["tokens_per_s"] > rec["tokens_per_s"]):
            return p
    return None


def _device_profile(device, measured) -> tuple[Profile, str]:
    if device is not None:
        return load_profile(device), str(device)
    here = find_profile("this-machine")  # what `edgemoe profile` writes (user_dir) or one in ./
    if here is not None:
        return read_profile(here), str(here)
    m = measured or measure_device(size=64 * MiB, mem_bytes=128 * MiB, kernels=False, time_limit=1.5)
    prof = parse_profile(yaml.safe_load(profile_yaml(m, "this-machine")), "measured")
    return prof, "measured now (no --device, no this-machine profile): 64 MiB test file"
