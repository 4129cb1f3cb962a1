"""The nested bit planes' format (see nested.py for the schemes): packing codes into planes, the
Scheme base class (plane layout, (de)serialization, matmul on the planes) and the numpy matmul path
(the numba kernel is in nested_kernels.py)."""

from __future__ import annotations

import numpy as np

from .nested_kernels import HAVE_NUMBA

if HAVE_NUMBA:
    from .nested_kernels import _nested_matmul

_PACKABLE = (1, 2, 4, 8)
_TILE_BYTES = 256 * 1024  # float32 scratch bound for the numpy fallback


# ---- packing ------------------------------------------------------------------------------------


def _pack(codes: np.ndarray, nbits: int, span: int) -> np.ndarray:
    """codes uint8 [n_out, n_in] (values < 2^nbits) -> packed uint8 [n_out * n_in * nbits / 8].
    Within each run of `span` columns (the planes use span = n_in, a whole row) with
    nb = span*nbits/8 bytes, byte k holds the code of column j*nb + k in bits [j*nbits, ...)."""
    n_out, n_in = codes.shape
    slots = 8 // nbits
    nb = span * nbits // 8
    c = codes.reshape(n_out, n_in // span, slots, nb).astype(np.uint8)
    out = np.zeros((n_out, n_in // span, nb), np.uint8)
    for j in range(slots):
        out |= (c[:, :, j, :] << np.uint8(j * nbits)).astype(np.uint8)
    return out.reshape(-1)


def _unpack(packed: np.ndarray, nbits: int, span: int, n_out: int, n_in: int) -> np.ndarray:
    """Inverse of _pack: uint8 [n_out, n_in]."""
    slots = 8 // nbits
    nb = span * nbits // 8
    p = packed.reshape(n_out, n_in // span, 1, nb)
    sh = (np.arange(slots, dtype=np.uint8) * nbits).reshape(1, 1, slots, 1)
    c = (p >> sh) & np.uint8((1 << nbits) - 1)
    return c.reshape(n_out, n_in)


def _decompose(bits: int) -> list[int]:
    if bits not in _PACKABLE:
        raise ValueError(f"a plane of {bits} bits cannot be packed (supported: {_PACKABLE})")
    return [bits]


# ---- schemes ---------------------------------------------------------------------------------------


class Scheme:
    """One nested bit-plane format. Subclasses define plane layout, encode and coefficients."""

    name: str = ""

    def __init__(self, bits: tuple[int, ...] = (2, 3, 4), group: int = 128):
        bits = tuple(int(b) for b in bits)
        if not bits or list(bits) != sorted(set(bits)) or bits[0] < 1 or bits[-1] > 8:
            raise ValueError(f"bits must be strictly ascending widths in 1..8, got {bits}")
        if group <= 0 or group % 8:
            raise ValueError(f"group must be a positive multiple of 8, got {group}")
        self.widths = bits
        self.group = int(group)
        self.plane_bits: list[int] = []  # bits per weight of each plane's codes
        self.plane_nscales: list[int] = []  # fp16 [n_out, G] arrays stored in each plane
        self._width_planes: dict[int, int] = {}
        self._layout()

    def _layout(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.widths}, group={self.group})"

    @property
    def n_planes(self) -> int:
        return len(self.plane_bits)

    def planes_for(self, bits: int) -> int:
        """How many leading planes make a `bits`-wide matrix."""
        try:
            return self._width_planes[int(bits)]
        except KeyError:
            raise ValueError(f"{self.name}: width {bits} is not one of {self.widths}") from None

    def width_of(self, n_planes: int) -> int:
        """The width read from the first n_planes planes (must be a readable prefix)."""
        for w, k in self._width_planes.items():
            if k == n_planes:
                return w
        raise ValueError(
            f"{self.name}: {n_planes} planes is not a readable prefix (readable: {sorted(self._width_planes.values())})"
        )

    def _check_shape(self, n_out: int, n_in: int) -> None:
        if n_out <= 0 or n_in <= 0 or n_in % self.group:
            raise ValueError(f"shape [{n_out}, {n_in}]: n_in must be a positive multiple of group={self.group}")

    def plane_nbytes(self, n_out: int, n_in: int) -> list[int]:
        self._check_shape(n_out, n_in)
        G = n_in // self.group
        return [n_out * n_in * b // 8 + ns * n_out * G * 2 for b, ns in zip(self.plane_bits, self.plane_nscales)]

    # -- plane (de)serialization --
    def _build_plane(self, p: int, codes: np.ndarray, scales: list[np.ndarray]) -> np.ndarray:
        parts = [_pack(codes, self.plane_bits[p], codes.shape[1])]  # row-wide slots
        for s in scales:
            parts.append(np.ascontiguousarray(s, dtype=np.float16).reshape(-1).view(np.uint8))
        return np.ascontiguousarray(np.concatenate(parts))

    def _split_plane(self, plane: np.ndarray, p: int, n_out: int, n_in: int):
        b = self.plane_bits[p]
        ncode = n_out * n_in * b // 8
        G = n_in // self.group
        plane = np.asarray(plane)
        if plane.dtype != np.uint8 or plane.ndim != 1:
            plane = np.ascontiguousarray(plane).view(np.uint8).reshape(-1)
        want = self.plane_nbytes(n_out, n_in)[p]
        if plane.shape[0] != want:
            raise ValueError(
                f"{self.name}: plane {p} has {plane.shape[0]} bytes, expected {want} for shape [{n_out}, {n_in}]"
            )
        codes = plane[:ncode]
        sc = plane[ncode:].view(np.float16).reshape(self.plane_nscales[p], n_out, G) if self.plane_nscales[p] else None
        return codes, sc

    def _check_planes(self, planes, n_out, n_in) -> list:
        self._check_shape(n_out, n_in)
        k = len(planes)
        if k < 1 or k > self.n_planes:
            raise ValueError(f"{self.name}: got {k} planes, have 1..{self.n_planes}")
        self.width_of(k)
        return [np.ascontiguousarray(p).view(np.uint8).reshape(-1) for p in planes]

    # -- coefficients: W^[o, g*group + i] = C[o, g] + sum_p A[p, o, g] * code_p[o, g*group + i] --
    def _coefs(self, scales: list, k: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _kind(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _mult(self, k: int) -> np.ndarray:
        return np.ones(k, np.float64)

    def dequantize(self, planes: list[np.ndarray], n_out: int, n_in: int) -> np.ndarray:
        """float32 [n_out, n_in] from the first len(planes) planes (tests / benchmarks only)."""
        planes = self._check_planes(planes, n_out, n_in)
        return _dequant_rows(self, planes, n_out, n_in, 0, n_out)

    def matmul(
        self, planes: list[np.ndarray], n_out: int, n_in: int, x: np.ndarray, backend: str | None = None
    ) -> np.ndarray:
        """x float32 [T, n_in] (or [n_in]) -> [T, n_out] = x @ W^T on the packed planes.
        backend: None (numba if installed), "numba" or "numpy"."""
        planes = self._check_planes(planes, n_out, n_in)
        squeeze = np.ndim(x) == 1
        x2 = np.ascontiguousarray(x[None, :] if squeeze else x, dtype=np.float32)
        if x2.ndim != 2 or x2.shape[1] != n_in:
            raise ValueError(f"x of shape {list(np.shape(x))} does not match n_in={n_in}")
        use = backend or ("numba" if HAVE_NUMBA else "numpy")
        if use == "numba":
            if not HAVE_NUMBA:
                raise RuntimeError("numba is not installed")
            xs = x2.reshape(x2.shape[0], n_in // self.group, self.group).sum(-1, dtype=np.float32)
            y = _nested_matmul(
                tuple(planes),
                np.array(self.plane_bits[: len(planes)], np.int64),
                np.array(self.plane_nscales[: len(planes)], np.int64),
                self._kind(),
                self._mult(len(planes)),
                self._offset(len(planes)),
                n_out,
                n_in,
                self.group,
                x2,
                xs,
                self._msym(),
            )
        elif use == "numpy":
            y = _matmul_numpy(self, planes, n_out, n_in, x2)
        else:
            raise ValueError(f"backend {backend!r}: expected 'numba' or 'numpy'")
        return y[0] if squeeze else y

    def _offset(self, k: int) -> float:
        return 0.0

    def _msym(self) -> float:
        return 0.0

    def encode(self, w: np.ndarray, act_scale: np.ndarray | None = None) -> list[np.ndarray]:
        parts = self.encode_parts(w, act_scale)
        return parts["planes"]

    def encode_parts(self, w, act_scale=None) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


# ---- numpy paths ------------------------------------------------------------------------------


def _dequant_rows(sch: Scheme, planes: list, n_out: int, n_in: int, r0: int, r1: int) -> np.ndarray:
    k = len(planes)
    gs = sch.group
    split = [sch._split_plane(planes[p], p, n_out, n_in) for p in range(k)]
    scales = [None if sc is None else sc[:, r0:r1] for _, sc in split]
    A, C = sch._coefs(scales, k)
    out = np.repeat(C, gs, axis=1).astype(np.float32)
    for p in range(k):
        b = sch.plane_bits[p]
        rb = n_in * b // 8
        codes = _unpack(split[p][0][r0 * rb : r1 * rb], b, n_in, r1 - r0, n_in)
        out += np.repeat(A[p], gs, axis=1) * codes.astype(np.float32)
    return out


def _matmul_numpy(sch: Scheme, planes: list, n_out: int, n_in: int, x: np.ndarray) -> np.ndarray:
    y = np.empty((x.shape[0], n_out), np.float32)
    step = max(1, _TILE_BYTES // (4 * n_in))
    for r0 in range(0, n_out, step):
        r1 = min(n_out, r0 + step)
        y[:, r0:r1] = x @ _dequant_rows(sch, planes, n_out, n_in, r0, r1).T
    return y
