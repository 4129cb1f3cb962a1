"""Tokenizer and chat template: llama.cpp's own, loaded from the GGUF vocabulary (vocab only)."""

from __future__ import annotations

import codecs
import ctypes
import os
from typing import Any

import numpy as np

from ..errors import EdgeMoEError

# A plain completion transcript for base models whose GGUF has no chat template.
PLAIN_ROLES = {"system": "", "user": "User: ", "assistant": "Assistant: "}
PLAIN_STOP = "\nUser:"


class Tokenizer:
    def __init__(self, path: str | os.PathLike[str]):
        import llama_cpp
        from llama_cpp import _internals

        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            self._m = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as exc:
            raise EdgeMoEError(f"{path}: llama.cpp could not load the vocabulary ({exc})") from None
        self.n_vocab = self._m.n_vocab()
        self.bos = self._m.token_bos()
        self.eos = self._m.token_eos()
        self.add_bos = bool(self._m.add_bos_token())
        self._vocab = self._m.vocab
        self._llama_cpp = llama_cpp
        meta = self._m.metadata()
        self.chat_template: str | None = meta.get("tokenizer.chat_template")

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise EdgeMoEError(f"text to tokenize must be a str, got {type(text).__name__}")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EdgeMoEError(
                f"text to tokenize is not valid Unicode ({exc.reason} at position {exc.start})"
            ) from None
        if not data:
            return [self.bos] if add_bos and self.add_bos and self.bos >= 0 else []
        return list(self._m.tokenize(data, add_bos, special))

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token, as llama.cpp renders it (may be part of a UTF-8 sequence)."""
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        for t in ids:
            if not 0 <= int(t) < self.n_vocab:
                raise EdgeMoEError(f"token id {t} out of range 0..{self.n_vocab - 1}")
        return self._m.detokenize([int(t) for t in ids], special).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def token_text(self, token: int) -> str:
        return self._m.token_get_text(token)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> tuple[str, list[str]]:
        """The prompt for these messages and extra stop strings. Uses the GGUF's template the way
        llama-cpp-python does (Jinja2); base models get a plain transcript."""
        _check_messages(messages)
        if self.chat_template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            bos = self.token_text(self.bos) if self.bos >= 0 else ""
            eos = self.token_text(self.eos) if self.eos >= 0 else ""
            try:
                resp = Jinja2ChatFormatter(self.chat_template, eos_token=eos, bos_token=bos)(messages=messages)
            except Exception as exc:  # jinja2 errors of every kind: the template is the model's
                raise EdgeMoEError(f"the model's chat template failed: {exc}") from None
            return resp.prompt, []
        parts = []
        for m in messages:
            parts.append(PLAIN_ROLES[m["role"]] + m["content"].strip() + "\n")
        parts.append("Assistant:")
        return "".join(parts), [PLAIN_STOP]

    def close(self) -> None:
        if getattr(self, "_m", None) is not None:
            self._m.close()
            self._m = None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise EdgeMoEError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in PLAIN_ROLES or not isinstance(m.get("content"), str):
            raise EdgeMoEError(
                f"messages[{i}] must be a dict with role in {sorted(PLAIN_ROLES)} and a str content, got {m!r}"
            )


class StreamDecoder:
    """Turns token pieces into text, holding back incomplete UTF-8 sequences."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self._dec.decode(piece)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


# Names of end-of-generation tokens in HF vocabularies (llama.cpp's EOG list, abridged).
_HF_EOG = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|end_of_text|>", "</s>", "<|return|>")


class HFTokenizer(Tokenizer):
    """The same interface as Tokenizer, from a Hugging Face tokenizer.json read with `tokenizers`
    (ONNX models: the tokenizer comes from tokenizer.json beside the model, copied into its store).
    bos / eos: the GGUF metadata's ids when given (config.json's), else tokenizer_config.json's."""

    def __init__(
        self, path: str | os.PathLike[str], *, n_vocab: int | None = None, metadata: dict[str, Any] | None = None
    ):
        import json
        from pathlib import Path

        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise EdgeMoEError(
                f"{path}: reading tokenizer.json needs the tokenizers package (pip install 'edgemoe[onnx]')"
            ) from None
        path = Path(path)
        try:
            self._tk = _HF.from_file(str(path))
            spec = json.loads(path.read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise EdgeMoEError(f"{path}: not a readable tokenizer.json ({exc})") from None
        cfg: dict = {}
        cpath = path.parent / "tokenizer_config.json"
        if cpath.is_file():
            try:
                cfg = json.loads(cpath.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise EdgeMoEError(f"{cpath}: unreadable ({exc})") from None
        size = self._tk.get_vocab_size(with_added_tokens=True)
        if n_vocab is not None and size > n_vocab:
            raise EdgeMoEError(f"{path}: vocabulary has {size} tokens but the model's embedding has {n_vocab} rows")
        self.n_vocab = n_vocab if n_vocab is not None else size
        meta = metadata or {}

        def token_id(key: str) -> int:
            v = meta.get(f"tokenizer.ggml.{key}_token_id")
            if v is not None:
                return int(v)
            t = cfg.get(f"{key}_token")
            t = t.get("content") if isinstance(t, dict) else t
            i = self._tk.token_to_id(t) if isinstance(t, str) else None
            return -1 if i is None else int(i)

        self.bos = token_id("bos")
        self.eos = token_id("eos")
        self.add_bos = bool(cfg.get("add_bos_token", False)) and self.bos >= 0
        self.chat_template = cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None
        self._special = {int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special")}
        dec = spec.get("decoder") or {}
        kinds = {dec.get("type")} | {d.get("type") for d in dec.get("decoders", []) or []}
        self._byte_level = "ByteLevel" in kinds
        self._byte_dec = {c: b for b, c in bytes_to_unicode().items()}
        self._eog = {self.eos} - {-1}
        for name in _HF_EOG:
            i = self._tk.token_to_id(name)
            if i is not None and i in self._special:
                self._eog.add(int(i))
        self._m = None

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise EdgeMoEError(f"text to tokenize must be a str, got {type(text).__name__}")
        ids = self._tk.encode(text, add_special_tokens=False).ids if text else []
        if add_bos and self.add_bos and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]
        return list(ids)

    def piece(self, token: int, special: bool = False) -> bytes:
        token = int(token)
        if token in self._special:
            return (self._tk.id_to_token(token) or "").encode("utf-8") if special else b""
        s = self._tk.id_to_token(token)
        if s is None:
            return b""
        if self._byte_level and all(c in self._byte_dec for c in s):
            return bytes(self._byte_dec[c] for c in s)
        if len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            try:
                return bytes([int(s[3:5], 16)])
            except ValueError:
                pass
        return s.replace("\u2581", " ").encode("utf-8")

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        for t in ids:
            if not 0 <= int(t) < self.n_vocab:
                raise EdgeMoEError(f"token id {t} out of range 0..{self.n_vocab - 1}")
        return b"".join(self.piece(int(t), special) for t in ids).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return int(token) in self._eog

    def token_text(self, token: int) -> str:
        return self._tk.id_to_token(int(token)) or ""

    def close(self) -> None:
        self._tk = None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def open_tokenizer(
    dense_path: str | os.PathLike[str],
    store_path: str | os.PathLike[str] | None = None,
    n_vocab: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> Tokenizer:
    """llama.cpp's tokenizer from the GGUF vocabulary, or, for a store that holds a tokenizer.json
    (converted from ONNX), the `tokenizers` one."""
    from pathlib import Path

    if store_path is not None and (Path(store_path) / "tokenizer.json").is_file():
        return HFTokenizer(Path(store_path) / "tokenizer.json", n_vocab=n_vocab, metadata=metadata)
    if (metadata or {}).get("edgemoe.source_format") == "onnx":
        raise EdgeMoEError(
            f"{store_path}: converted from ONNX without a tokenizer.json: put the model's "
            "tokenizer.json (and tokenizer_config.json) beside the .onnx file and convert again"
        )
    return Tokenizer(dense_path)


def as_token_ids(token_ids: Any, n_vocab: int) -> np.ndarray:
    """Token ids a caller passed, as int64 [n], or one error saying what is wrong with them."""
    try:
        ids = np.asarray(token_ids)
    except (TypeError, ValueError):
        raise EdgeMoEError(f"token ids must be a list of ints, got {type(token_ids).__name__}") from None
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise EdgeMoEError("token ids must be a non-empty 1-D list of ints")
    if ids.min() < 0 or ids.max() >= n_vocab:
        raise EdgeMoEError(f"token id out of range 0..{n_vocab - 1}: got {int(ids.min())}..{int(ids.max())}")
    return ids.astype(np.int64)
