"""`edgemoe profile`: measure this device (a profile YAML in edgemoe.devices.profiles' format, written to the
user's profiles, profiles.user_dir), or profile a model's routing on this device (report.md with plots, a
recommended budget, width and cache size).

The CLI glue; the work is done in edgemoe.devices.measure (device figures, profile YAML),
edgemoe.devices.kernel_speed (kernel throughput), edgemoe.devices.model_profile (model profile,
prediction model, recommendation), edgemoe.devices.cachesim (routing statistics, cache simulator)
and edgemoe.devices.report (report.md and plots).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeMoEError
from ..options import add_threads_option
from ..runtime.memory import format_size, parse_size
from .measure import SEQ_BLOCK, MiB, measure_device, profile_yaml, summary_table, write_profile
from .model_profile import profile_model
from .profiles import find_profile, looks_like_path, search_dirs, shown, user_dir


def add_arguments(p) -> None:
    p.add_argument("-m", "--model", help="profile this model's routing on this device instead (needs --text)")
    p.add_argument("--text", help="text file whose first --tokens tokens make the routing trace")
    p.add_argument("-n", "--tokens", type=int, default=256, help="tokens to trace (default 256)")
    p.add_argument("--out-dir", help="where the model report goes (default: profile-MODEL/)")
    p.add_argument(
        "--device",
        help="device profile (name or YAML path) for the model report's prediction "
        "(default: the this-machine profile if one is found by name, else measured now)",
    )
    p.add_argument("--storage", help="measure the storage holding this directory (default: ~/.cache/edgemoe)")
    p.add_argument(
        "--out",
        help="profile to write (default: NAME.yaml in the user's profiles, $XDG_CONFIG_HOME/edgemoe/profiles or "
        f"~/.config/edgemoe/profiles, here {user_dir()}; --profile NAME then finds it)",
    )
    p.add_argument("--name", default="this-machine", help="profile name (default this-machine)")
    p.add_argument("--description", help="profile description")
    p.add_argument("--size", default="256MiB", help="storage test file size (default 256MiB)")
    p.add_argument("--mem-size", default="256MiB", help="memory bandwidth array size (default 256MiB)")
    p.add_argument("--time-limit", type=float, default=4.0, help="seconds per storage test at most (default 4)")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel throughput measurements")
    p.add_argument("--no-plots", action="store_true", help="model report without PNG plots")
    p.add_argument("--trace", help="use this saved routing trace (trace.npy of an earlier report) instead of decoding")
    add_threads_option(p)


def run_cli(args) -> int:
    if args.threads is not None:
        from ..quant import kernels

        kernels.set_threads(args.threads)
    if args.model:
        if not args.text and not args.trace:
            raise EdgeMoEError("profiling a model needs --text FILE (or a saved --trace)")
        if args.tokens < 2:
            raise EdgeMoEError(f"--tokens must be at least 2, got {args.tokens}")
        out_dir = Path(args.out_dir or f"profile-{Path(args.model).stem}")
        res = profile_model(
            args.model,
            args.text,
            out_dir,
            tokens=args.tokens,
            device=args.device,
            plots=not args.no_plots,
            trace_path=args.trace,
        )
        rec = res["recommendation"]
        print(f"report: {out_dir / 'report.md'}")
        if rec:
            print(
                f"recommended: budget {format_size(rec['budget'])}, {rec['bits']}-bit experts (quality max, "
                f"lossless), {rec['slots']} cache slots ({rec['policy']}), predicted {rec['tokens_per_s']:.2f} tokens/s"
            )
        else:
            print("nothing fits the device's default budget at every plane (see the report)")
        lossy = res["lossy_option"]
        if lossy:
            print(
                f"opt-in, lossy: {lossy['bits']}-bit experts (--bits {lossy['bits']}), budget "
                f"{format_size(lossy['budget'])}, predicted {lossy['tokens_per_s']:.2f} tokens/s"
            )
        return 0
    size = parse_size(args.size, "--size")
    mem = parse_size(args.mem_size, "--mem-size")
    if size < 2 * SEQ_BLOCK:
        raise EdgeMoEError(f"--size must be at least {2 * SEQ_BLOCK // MiB}MiB, got {args.size!r}")
    name = args.name
    if not name or looks_like_path(name):
        raise EdgeMoEError(f"--name {name!r}: a profile name is a file stem (no directory, no .yaml)")
    out = Path(args.out) if args.out else user_dir() / f"{name}.yaml"
    storage = Path(args.storage) if args.storage else None
    if storage is not None and not storage.is_dir():
        raise EdgeMoEError(f"--storage {storage}: not a directory")
    m = measure_device(storage, size=size, mem_bytes=mem, kernels=not args.no_kernels, time_limit=args.time_limit)
    m["mem_bytes"] = mem
    text = profile_yaml(m, name, args.description)
    write_profile(text, out)
    print(summary_table(m, out))
    print(_how_to_use(name, out))
    return 0


def _how_to_use(name: str, out: Path) -> str:
    """How --profile names the profile just written: by NAME where the search finds this file."""
    found = find_profile(name)
    if found is not None and found.resolve() == out.resolve():
        return f'use it with --profile {name} (e.g. edgemoe run --profile {name} "...")'
    if found is not None:
        return f"use it with --profile {out} (--profile {name} finds {shown(found)} first)"
    return f"use it with --profile {out} (--profile NAME looks in {', '.join(shown(d) for d in search_dirs())})"
