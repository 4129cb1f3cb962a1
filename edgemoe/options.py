"""The options every model-running subcommand shares (cli.py; chat in tui/cli.py), and the model
they name."""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse whose option errors are one line with a hint, not the usage block:
    `edgemoe: error: argument --ctx: invalid int value: 'x' (see `edgemoe run --help`)`, exit 2."""

    def error(self, message: str, prog: str | None = None):
        self.exit(2, f"edgemoe: error: {message} (see `{prog or self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:  # found after the subcommand's parser returned: the hint names the subcommand
            cmd = getattr(ns, "command", None)
            self.error(f"unrecognized arguments: {' '.join(extra)}", f"{self.prog} {cmd}" if cmd else None)
        return ns


def one_line_warnings() -> None:
    """Show the package's warnings as `edgemoe: warning: ...`, one line each (for the CLI)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"edgemoe: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show


def add_threads_option(p: argparse.ArgumentParser, what: str = "kernel threads") -> None:
    p.add_argument(
        "-t",
        "--threads",
        type=threads_arg,
        default=None,
        help=f"{what} (default: EDGEMOE_THREADS, else the physical cores, as llama.cpp)",
    )


def threads_arg(value: str) -> int:
    """-t/--threads: a positive integer (argparse reports anything else as one line, exit 2)."""
    from .errors import EdgeMoEError
    from .quant.threads import parse_threads

    try:
        return parse_threads(value)
    except EdgeMoEError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None


def add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--model",
        help="GGUF model file, ONNX MoE decoder (.onnx) or expert store directory (default: the bundled model)",
    )
    p.add_argument(
        "--budget",
        help="memory budget for everything the model holds, e.g. 1.5GiB or 800MB; "
        "a GGUF is converted into an expert store on first use",
    )
    p.add_argument("-c", "--ctx", type=int, default=None, help="context length (default: min(4096, training context))")
    p.add_argument("--kv-type", choices=["f16", "f32"], default="f16", help="KV cache type (default f16, as llama.cpp)")
    p.add_argument("--bits", type=int, default=None, help="read experts at this nested width (default: all planes)")
    p.add_argument(
        "--policy",
        choices=["lru", "lfu", "score"],
        default="score",
        help="expert cache eviction policy (default score: recency, frequency and layer distance)",
    )
    p.add_argument(
        "--quality",
        default=None,
        help="max (the default: every plane of every chosen expert, no skipping; lossless, and "
        "always so for a GGUF in place), or, opt-in and lossy, balanced, fast or thresholds "
        "'high,low[,naee]' (see README)",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="device profile: a YAML path, or a name found as NAME.yaml in ., ./profiles, the user's profiles "
        "(~/.config/edgemoe/profiles, where `edgemoe profile` writes) or the shipped ones; its default budget "
        "when --budget is not given",
    )
    p.add_argument("--no-pipeline", action="store_true", help="read experts synchronously (no background I/O)")
    add_threads_option(p)
    p.add_argument(
        "--prefetch",
        action="store_true",
        help="prefetch the next layer's predicted experts (off by default: see docs/benchmarks.md)",
    )


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate (default 256)")
    p.add_argument("--temperature", "--temp", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="default 40; 0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="default 0.95; 1 = off")
    p.add_argument("--min-p", type=float, default=0.05, help="default 0.05; 0 = off")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="default 1.0 = off")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def budget_of(args: argparse.Namespace):
    """--budget, else the --profile's default budget, else None."""
    if args.budget is None and getattr(args, "profile", None):
        from .devices.profiles import load_profile

        return load_profile(args.profile).default_budget
    return args.budget


def load_options(args: argparse.Namespace, memory_budget=None) -> dict:
    """edgemoe.load's keyword arguments as the load options say (the model path is args.model);
    memory_budget (when given) in place of budget_of(args). The chat TUI reloads with them."""
    return dict(
        memory_budget=budget_of(args) if memory_budget is None else memory_budget,
        quality=args.quality,
        n_ctx=args.ctx,
        kv_type=args.kv_type,
        bits=args.bits,
        cache_policy=args.policy,
        pipeline=not args.no_pipeline,
        prefetch=args.prefetch,
        threads=getattr(args, "threads", None),
    )


def load_model(args: argparse.Namespace, memory_budget=None):
    """The model the load options name; memory_budget (when given) in place of budget_of(args)."""
    from .api import load

    return load(args.model, **load_options(args, memory_budget))
