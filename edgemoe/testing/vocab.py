"""The synthetic models' tokenizer: a byte-level GPT-2 BPE vocabulary with merges learnt from a
small built-in text, and the tokenizer metadata llama.cpp reads."""

from __future__ import annotations

import re
from collections import Counter

import gguf

from ..models.tokenizer import bytes_to_unicode  # GPT-2's byte map, as llama.cpp's BPE vocab uses it
from .spec import N_SPECIAL

_SAMPLE_TEXT = """\
The quick brown fox jumps over the lazy dog. Mixture of experts models route every token to a
few experts; the router picks the top experts and the others are skipped. In the beginning there
was the word, and the word was with the model. Whitespace    matters:   tabs\tand\nnewlines too.
Café, naïve, résumé, jalapeño, Ångström, Zürich, São Paulo, déjà vu, coöperate, façade.
def main(argv):\n    return 0\n\nfor i in range(10):\n    print(i, i * i)\n
Numbers 0123456789 and 3.14159, 2.71828; emails like user@example.com and URLs https://x.org.
"""

_PRE_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


def build_vocab(n_normal: int) -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token_types) for a byte-level BPE vocab with n_normal normal tokens.

    The 256 byte tokens come in GPT-2's order (printable ASCII first, as in real GPT-2 vocabs;
    this also keeps llama.cpp's truncated log line of the first tokens valid UTF-8).
    Merges are learnt greedily on _SAMPLE_TEXT; if the text runs
    out of pairs, the remaining ids are filled with unused placeholder tokens.
    """
    enc = bytes_to_unicode()
    tokens = list(enc.values())
    words = Counter(tuple(enc[b] for b in w.encode("utf-8")) for w in _PRE_RE.findall(_SAMPLE_TEXT))
    merges: list[str] = []
    known = set(tokens)
    while len(tokens) < n_normal:
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        merges.append(f"{a} {b}")
        if merged not in known:
            tokens.append(merged)
            known.add(merged)
        new_words: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    types = [gguf.TokenType.NORMAL] * len(tokens)
    while len(tokens) < n_normal:  # filler, never produced by the tokenizer
        tokens.append(f"<unused{len(tokens)}>")
        types.append(gguf.TokenType.UNUSED)
    tokens += ["<|bos|>", "<|endoftext|>", "<|pad|>"]  # llama.cpp knows <|endoftext|> as EOG
    types += [gguf.TokenType.CONTROL] * N_SPECIAL
    return tokens, merges, [int(t) for t in types]


def add_tokenizer(w: gguf.GGUFWriter, n_normal: int) -> None:
    tokens, merges, types = build_vocab(n_normal)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(n_normal)
    w.add_eos_token_id(n_normal + 1)
    w.add_pad_token_id(n_normal + 2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
