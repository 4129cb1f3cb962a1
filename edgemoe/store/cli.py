"""The store commands: `info`, `convert`, `verify` and `stores`; cli.build_parser registers them
with add_subcommands."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from ..errors import EdgeMoEError


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert, parse_bits

    bits = parse_bits(args.bits) if args.bits else None
    out = convert(
        args.model, args.output, bits=bits, scheme=args.scheme, calibration=args.calibration, force=args.force
    )
    print(out)
    return 0


def cmd_stores(args: argparse.Namespace) -> int:
    from ..runtime.memory import format_size
    from . import catalog

    if args.rm:
        for name in args.rm:
            print(f"removed {catalog.remove(name)}")
        return 0
    entries = catalog.list_stores()
    if not entries:
        print(f"no expert stores (the cache is {catalog.cache_dir()})")
        return 0
    rows = [("STORE", "SIZE", "SOURCE", "LAST USED")]
    for e in entries:
        src = f"{e.source} (gone)" if e.source_present is False else e.source
        rows.append((str(e.path), format_size(e.nbytes), src, catalog.age(e.last_used)))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import main as verify_main

    return verify_main(args.store, quiet=args.quiet)


def _store_rows(path: Path) -> list[tuple[str, str]]:
    from ..runtime.memory import format_size
    from .reader import StoreReader

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
    from ..models.config import ModelArgs
    from ..models.gguf_file import GGUFFile
    from ..runtime.memory import format_size
    from .reader import DENSE, StoreReader, is_store

    model = args.model_opt or args.model
    if args.model_opt and args.model and args.model_opt != args.model:
        raise EdgeMoEError(f"info takes one model: got {args.model} and -m {args.model_opt}")
    if model is None:
        from ..api import bundled_model_path

        model = str(bundled_model_path())
    args.model = model
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


def add_subcommands(sub) -> None:
    """info, convert, verify, stores."""
    i = sub.add_parser("info", help="architecture, experts, tensor types and sizes of a GGUF model")
    i.add_argument("model", nargs="?", help="GGUF model file or expert store directory (default: the bundled model)")
    i.add_argument("-m", "--model", dest="model_opt", metavar="MODEL", help="the same, as the other commands take it")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="write an expert store (nested-bit experts) from a GGUF or ONNX model")
    c.add_argument("model", help="GGUF model file, or an ONNX MoE decoder (model.onnx; see docs/onnx.md)")
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

    st = sub.add_parser(
        "stores",
        help="list the expert stores edgemoe wrote (size, source, last use), or remove one (--rm)",
        description="List the expert stores edgemoe wrote: the cache's (EDGEMOE_CACHE, default "
        "~/.cache/edgemoe/stores; stores converted on first use of a GGUF with --budget) and those "
        "`edgemoe convert` wrote elsewhere. --rm deletes one by name or path.",
    )
    st.add_argument("--rm", metavar="STORE", action="append", help="remove this store (name or path; repeatable)")
    st.set_defaults(func=cmd_stores)
