"""The `edgemoe` command: a thin dispatcher over the API. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from .errors import EdgeMoEError
from .options import add_load_options, add_sampling_options, load_model

EXIT_BAD_INPUT = 2


def cmd_run(args: argparse.Namespace) -> int:
    with load_model(args) as model:
        last = None
        for r in model.stream(
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repeat_penalty=args.repeat_penalty,
            seed=args.seed,
            stop=args.stop,
        ):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
        sys.stdout.write("\n")
        if args.stats and last is not None:
            _print_stats(last.stats)
    return 0


def _print_stats(s) -> None:
    from .runtime.memory import format_size
    from .runtime.policy import quality_label
    from .runtime.stats import percent

    rows = [
        ("quality", quality_label(s.quality, s.lossless)),
        ("prompt tokens", f"{s.prompt_tokens}"),
        ("prompt tokens/s", f"{s.prompt_tokens_per_s:.1f}"),
        ("generated tokens", f"{s.generated_tokens}"),
        ("decode tokens/s", f"{s.decode_tokens_per_s:.2f}"),
        ("resident now", format_size(s.resident_bytes)),
        ("resident peak", format_size(s.peak_resident_bytes)),
        ("budget", format_size(s.budget_bytes)),
        ("model file", format_size(s.model_bytes)),
    ]
    c = s.cache
    if c is not None:
        tokens = max(s.generated_tokens + s.prompt_tokens, 1)
        rows += [
            ("expert cache", f"{format_size(c.cache_bytes)} of {format_size(c.cache_capacity)}"),
            ("hits / partial / misses", f"{c.hits} / {c.partial_hits} / {c.misses} (hit rate {percent(c.hit_rate)})"),
            ("bytes read", f"{format_size(c.bytes_read)} ({format_size(c.bytes_read / tokens)} per token)"),
            ("evictions / upgrades / downgrades", f"{c.evictions} / {c.upgrades} / {c.downgrades}"),
            ("I/O stall", f"{c.io_stall_s:.2f} s"),
            (
                "resident by bits",
                ", ".join(f"{b}-bit {format_size(n)}" for b, n in sorted(c.resident_bytes_by_bits.items())) or "-",
            ),
        ]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows), file=sys.stderr)
    if c is not None:
        print(
            f"{'layer':>5} {'hits':>7} {'partial':>7} {'misses':>7} {'hit rate':>8} {'read':>11} {'evict':>6} "
            f"{'stall s':>7}",
            file=sys.stderr,
        )
        for i, l in enumerate(c.layers):
            print(
                f"{i:>5} {l.hits:>7} {l.partial_hits:>7} {l.misses:>7} {percent(l.hit_rate):>8} "
                f"{format_size(l.bytes_read):>11} {l.evictions:>6} {l.io_stall_s:>7.2f}",
                file=sys.stderr,
            )


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.server import serve

    if args.max_queue < 0:
        raise EdgeMoEError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise EdgeMoEError(f"--port must be in 0..65535, got {args.port}")
    with load_model(args) as model:
        serve(model, args.host, args.port, max_queue=args.max_queue, log=not args.quiet)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """NAEE's per-layer skip thresholds from text, saved beside the store (calibration.json)."""
    from .runtime import evaluate
    from .runtime.policy import Calibration, betas_from_ratios

    text = _read_text(args.text)
    with load_model(args) as model:
        if model.streamed_experts is None:
            raise EdgeMoEError("calibration needs an expert store: give a store, or a GGUF with --budget")
        model.set_quality("max")
        exp = model.streamed_experts
        exp.ratios = [[] for _ in range(model.config.n_layer)]
        ids = model.tokenize(text, add_bos=False)[: args.tokens]
        for w in evaluate.windows_of(ids, min(args.window, len(ids)), None):
            model.logits(w)
        betas = betas_from_ratios(exp.ratios)
        exp.ratios = None
        path = Calibration(betas).save(model.store_path, dict(text=str(args.text), tokens=len(ids)))
    print(f"{path}: beta per layer " + " ".join("-" if b is None else f"{b:.3f}" for b in betas))
    return 0


def _read_text(path_str: str) -> str:
    path = Path(path_str)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeMoEError(f"{path}: cannot read text file ({exc})") from None


def cmd_emulate(args: argparse.Namespace) -> int:
    """Run a command as if on the profile's device: its RAM as a memory cgroup cap, its storage's
    sequential read speed as a blkio throttle, its readahead, from a cold page cache."""
    from .devices import cgroup
    from .devices.profiles import load_profile

    prof = load_profile(args.profile)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise EdgeMoEError("emulate needs a command after --, e.g. edgemoe emulate --profile P -- edgemoe run hi")
    device, disk = cgroup.block_device_of(args.storage)
    mem = args.memory or prof.ram
    bps = int(prof.storage.seq_read_mbps * 1e6)
    print(
        f"edgemoe: emulating {prof.name}: memory {mem / 2**30:.2f} GiB, reads {prof.storage.seq_read_mbps:g} MB/s "
        f"on {disk} ({device}), readahead {prof.storage.readahead_kb} KB, cold page cache",
        file=sys.stderr,
    )
    with cgroup.readahead(disk, prof.storage.readahead_kb):
        cgroup.drop_caches()
        with cgroup.limits(mem_bytes=int(mem), read_bps=bps, device=device) as cgs:
            try:
                proc = cgroup.run_in(cgs, cmd)
            except FileNotFoundError:
                raise EdgeMoEError(f"{cmd[0]}: command not found") from None
            if proc.returncode and cgroup.oom_killed(cgs):
                print(f"edgemoe: {cmd[0]} was OOM-killed under the {mem / 2**30:.2f} GiB cap", file=sys.stderr)
    return proc.returncode


def cmd_convert(args: argparse.Namespace) -> int:
    from .store.convert import convert, parse_bits

    bits = parse_bits(args.bits) if args.bits else None
    out = convert(
        args.model, args.output, bits=bits, scheme=args.scheme, calibration=args.calibration, force=args.force
    )
    print(out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .store.verify import main as verify_main

    return verify_main(args.store, quiet=args.quiet)


def _store_rows(path: Path) -> list[tuple[str, str]]:
    from .runtime.memory import format_size
    from .store.reader import StoreReader

    r = StoreReader(path)
    man = r.manifest
    planes_for = man["scheme"]["planes_for"]
    per_width = ", ".join(f"{b}-bit {format_size(r.expert_bytes(int(planes_for[str(b)])))}" for b in r.bits)
    experts_all = r.all_experts_bytes()
    rows = [
        (
            "expert store",
            f"format {man['format_version']}, from {man['source']['file']} "
            f"({man['source']['expert_bits_per_weight']:g} bits/weight experts)",
        ),
        (
            "nested scheme",
            f"{r.scheme_name}, widths {','.join(map(str, r.bits))}, group {r.group}, "
            f"{r.n_planes} planes{', activation-aware' if man['scheme'].get('activation_aware') else ''}",
        ),
        ("store: dense (resident)", format_size(r.dense_path.stat().st_size)),
        ("store: experts, all planes", format_size(experts_all)),
        ("store: per expert by width", per_width + (" (the largest layer's)" if r.native else "")),
    ]
    if r.native:  # the source's types, kept: gate/up/down per layer, counted
        kinds: dict[str, int] = {}
        for s in r.schemes:
            if s is not None:
                k = "/".join(s.types[m].name for m in ("gate", "up", "down"))
                kinds[k] = kinds.get(k, 0) + 1
        rows.insert(2, ("source types (gate/up/down)", ", ".join(f"{k} in {n} layers" for k, n in kinds.items())))
    r.close()
    return rows


def cmd_info(args: argparse.Namespace) -> int:
    from .models.config import ModelArgs
    from .models.gguf_file import GGUFFile
    from .runtime.memory import format_size
    from .store.reader import DENSE, StoreReader, is_store

    store_rows = []
    if is_store(args.model):
        store_rows = _store_rows(Path(args.model))
        reader = StoreReader(args.model)
        f = GGUFFile(Path(args.model) / DENSE)
        c = ModelArgs.from_gguf(f, n_ff_exp=reader.n_ff_exp)
        reader.close()
    else:
        f = GGUFFile(args.model)
        c = ModelArgs.from_gguf(f)
    types = Counter(t.qtype.name for t in f.tensors.values())
    expert_bytes = sum(t.nbytes for n, t in f.tensors.items() if n.endswith("_exps.weight"))
    total = sum(t.nbytes for t in f.tensors.values())
    per_expert = expert_bytes // (c.n_layer * c.n_expert) if expert_bytes else 0
    shexp = "yes" if c.has_shared_expert else "no"
    rows = [
        ("file", str(f.path)),
        ("architecture", c.arch),
        ("name", str(f.get("general.name", "-"))),
        ("layers", str(c.n_layer)),
        ("hidden size", str(c.n_embd)),
        ("heads / kv heads", f"{c.n_head} / {c.n_head_kv} (head size {c.head_dim})"),
        ("experts", str(c.n_expert)),
        ("experts per token (top-k)", str(c.n_expert_used)),
        ("expert FFN width", str(c.n_ff_exp)),
        ("shared experts", shexp),
        ("vocab", str(c.n_vocab)),
        ("training context", str(c.n_ctx_train)),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in types.most_common())),
        ("size: total tensors", format_size(total)),
        ("size: dense (resident)", format_size(total - expert_bytes)),
        ("size: experts", format_size(expert_bytes)),
        ("size: per expert (one layer)", format_size(per_expert)),
    ]
    if store_rows:
        rows = [r for r in rows if not r[0].startswith("size:")] + store_rows
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    f.close()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .runtime import evaluate
    from .runtime.policy import quality_label

    path = Path(args.text)
    text = _read_text(args.text)
    with load_model(args) as model:
        if args.window > model.n_ctx:
            raise EdgeMoEError(f"--window {args.window} is larger than the context n_ctx={model.n_ctx}")
        tokens = model.tokenize(text, add_bos=False)
        wins = evaluate.windows_of(tokens, args.window, args.max_windows)
        results = [evaluate.perplexity("edgemoe", model.logits, wins)]
        model_path = model.path
        s = model.stats()
        quality = quality_label(s.quality, s.lossless)
    if not args.no_reference:
        fn, close = evaluate.llama_cpp_logits_fn(str(model_path), args.window)
        try:
            results.append(evaluate.perplexity("llama.cpp", fn, wins))
        finally:
            close()
    print(
        f"text {path}: {len(tokens)} tokens, {len(wins)} windows of {args.window}, "
        f"{results[0].tokens_scored} tokens scored; edgemoe quality {quality}"
    )
    print(f"{'engine':<10} {'perplexity':>11} {'nll/token':>10} {'tokens/s':>9}")
    for r in results:
        print(f"{r.engine:<10} {r.perplexity:>11.4f} {r.nll:>10.5f} {r.tokens_per_s:>9.1f}")
    if len(results) == 2:
        print(f"ratio edgemoe/llama.cpp perplexity {results[0].perplexity / results[1].perplexity:.5f}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .devices import profiler

    return profiler.run_cli(args)


def _size(value: str) -> int:
    from .runtime.memory import parse_size

    return parse_size(value, "size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgemoe",
        description="Run Mixture-of-Experts GGUF models on devices whose memory is smaller than the model.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # in the order `edgemoe --help` lists them
    _add_run(sub)
    _add_store_commands(sub)
    _add_serve(sub)
    _add_calibrate(sub)
    _add_bench(sub)
    _add_emulate(sub)
    _add_eval(sub)
    _add_profile(sub)

    from .tui.cli import add_subcommands as _tui_subcommands  # chat, monitor (Textual is imported on use)

    _tui_subcommands(sub)
    return p


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="generate text from a prompt, streamed to stdout")
    add_load_options(r)
    add_sampling_options(r)
    r.add_argument("prompt", help="the prompt text")
    r.add_argument(
        "--stats",
        action="store_true",
        help="print a summary table (quality, speed, memory, expert cache) to stderr at the end",
    )
    r.set_defaults(func=cmd_run)


def _add_store_commands(sub) -> None:
    """info, convert, verify."""
    i = sub.add_parser("info", help="architecture, experts, tensor types and sizes of a GGUF model")
    i.add_argument("model", help="GGUF model file or expert store directory")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="write an expert store (nested-bit experts) from a GGUF model")
    c.add_argument("model", help="GGUF model file")
    c.add_argument("-o", "--output", help="store directory (default: MODEL with the suffix .edgemoe)")
    c.add_argument(
        "--bits",
        help="nested widths of a matquant or d2moe store, e.g. 2,3,4 or 2,4,8 (default: 2,3,4 for sources of "
        "<= 5 bits, else 2,4,8)",
    )
    c.add_argument(
        "--scheme",
        choices=("native", "matquant", "d2moe"),
        help="how experts become nested planes: native (default for quantized experts: the source's own "
        "blocks, so --quality max is the source exactly; the widths follow its types), matquant (default "
        "for float experts or with --bits: re-fitted planes; all-Q4_0 experts are stored as matquant-sym) "
        "or d2moe",
    )
    c.add_argument("--calibration", help="text file: fit scales activation-aware on it")
    c.add_argument("--force", action="store_true", help="replace an existing store")
    c.set_defaults(func=cmd_convert)

    vf = sub.add_parser(
        "verify", help="check an expert store: manifest, shards, every plane's checksum (exit 0 clean, 2 damaged)"
    )
    vf.add_argument("store", help="expert store directory")
    vf.add_argument("--quiet", action="store_true", help="print nothing when the store is clean")
    vf.set_defaults(func=cmd_verify)


def _add_serve(sub) -> None:
    sv = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /stats, /metrics)",
    )
    add_load_options(sv)
    sv.add_argument(
        "--host",
        default=None,
        help="address to listen on (default 127.0.0.1; a non-loopback "
        "address serves beyond this machine, without authentication)",
    )
    sv.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    sv.add_argument(
        "--max-queue",
        type=int,
        default=8,
        help="requests that may wait behind the one generating; more are answered 429 (default 8)",
    )
    sv.add_argument("--quiet", action="store_true", help="do not log requests to stderr")
    sv.set_defaults(func=cmd_serve)


def _add_calibrate(sub) -> None:
    k = sub.add_parser("calibrate", help="calibrate expert skipping (NAEE thresholds) on text; saved beside the store")
    add_load_options(k)
    k.add_argument("--text", required=True, help="UTF-8 calibration text")
    k.add_argument("--tokens", type=int, default=2048, help="tokens of the text to use (default 2048)")
    k.add_argument("--window", type=int, default=256, help="tokens per evaluation window (default 256)")
    k.set_defaults(func=cmd_calibrate)


def _add_bench(sub) -> None:
    """Listed in the help only: main() hands `edgemoe bench ...` to its own parser."""
    b = sub.add_parser(
        "bench",
        add_help=False,
        help="llama.cpp and edgemoe side by side on an emulated device (see edgemoe bench --help)",
    )
    b.add_argument("rest", nargs=argparse.REMAINDER)


def _add_emulate(sub) -> None:
    em = sub.add_parser("emulate", help="run a command as if on a device profile (Linux, root, cgroup v1)")
    em.add_argument("--profile", required=True, help="device profile name or YAML path")
    em.add_argument("--memory", type=_size, default=None, help="memory cap instead of the profile's RAM (e.g. 2GiB)")
    em.add_argument("--storage", default=".", help="a path on the disk to throttle (default: the current directory)")
    em.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    em.set_defaults(func=cmd_emulate)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="perplexity over a text file, with llama.cpp's as the reference line")
    add_load_options(e)
    e.add_argument("--text", required=True, help="UTF-8 text file")
    e.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    e.add_argument("--no-reference", action="store_true", help="skip the llama.cpp reference line")
    e.set_defaults(func=cmd_eval)


def _add_profile(sub) -> None:
    pr = sub.add_parser(
        "profile",
        help="measure this device into a profile YAML, or profile a model's routing "
        "on it (-m MODEL --text FILE: report.md with plots and a recommended budget)",
    )
    from .devices.profiler import add_arguments as _profile_arguments

    _profile_arguments(pr)
    pr.set_defaults(func=cmd_profile)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser (edgemoe/devices/bench.py), options and --help included
        args = argparse.Namespace(func=lambda a: __import__("edgemoe.devices.bench", fromlist=["main"]).main(argv[1:]))
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgeMoEError as exc:
        print(f"edgemoe: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
