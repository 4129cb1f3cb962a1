"""Where expert stores converted on first use live: ~/.cache/edgemoe/stores (EDGEMOE_CACHE
moves it), one store per GGUF file, named by the file's name and a hash of its path, size and
modification time."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def store_key(gguf_path: Path) -> str:
    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"{gguf_path.stem}-{hashlib.sha1(ident.encode()).hexdigest()[:12]}"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEMOE_CACHE", Path.home() / ".cache" / "edgemoe")) / "stores"
