"""Tokenizer and chat template: llama.cpp's own, loaded from the GGUF vocabulary (vocab only)."""

from __future__ import annotations

import codecs
import ctypes
import os
from typing import Any

from .errors import EdgeMoEError

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
        data = text.encode("utf-8")
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
