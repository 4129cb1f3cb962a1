"""The `edgemoe` command: a thin dispatcher over the API. Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import EdgeMoEError
from .options import Parser, add_load_options, add_sampling_options, budget_of, load_model, one_line_warnings
from .store.cli import add_subcommands as _store_subcommands

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
                "skipped experts",
                f"{c.skipped} of {c.chosen} chosen ({percent(c.skipped / c.chosen if c.chosen else None)})",
            ),
            (
                "expert computations by width",
                ", ".join(f"{b}-bit {n}" for b, n in sorted(c.uses_by_bits.items())) or "-",
            ),
            (
                "prefetch issued / used / cancelled",
                f"{c.prefetch_issued} / {c.prefetch_hits} / {c.prefetch_cancelled}, "
                f"{format_size(c.prefetch_wasted_bytes)} wasted",
            ),
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
    if args.max_tokens is not None and args.max_tokens < 1:
        raise EdgeMoEError(f"--max-tokens must be positive, got {args.max_tokens}")
    with load_model(args) as model:
        serve(model, args.host, args.port, max_queue=args.max_queue, log=not args.quiet, max_tokens=args.max_tokens)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """NAEE's per-layer skip thresholds from text, saved beside the store (calibration.json)."""
    from .runtime import evaluate
    from .runtime.policy import Calibration, betas_from_ratios

    text = _read_text(args.text)
    budget = None
    if args.model is None and budget_of(args) is None:  # the bundled model: calibrate its expert store
        from .runtime.memory import available

        budget = int(0.8 * available())
    with load_model(args, budget) as model:
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
        fn, close = evaluate.llama_cpp_logits_fn(str(model_path), args.window, args.threads)
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
    from . import __version__

    p = Parser(
        prog="edgemoe",
        description="Run Mixture-of-Experts GGUF models on devices whose memory is smaller than the model.",
    )
    p.add_argument("--version", action="version", version=f"edgemoe {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # in the order `edgemoe --help` lists them
    _add_run(sub)
    _store_subcommands(sub)  # info, convert, verify, stores
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
    sv.add_argument(
        "-n",
        "--max-tokens",
        type=int,
        default=None,
        help="tokens to generate for a request that does not say (default: 16 for /v1/completions, as "
        "OpenAI; the rest of the context for /v1/chat/completions)",
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
    one_line_warnings()
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
