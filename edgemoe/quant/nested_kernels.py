"""The numba kernels of the nested schemes: matmul on the packed planes (_nested_matmul, described
in nested.py's docstring) and D2MoE's residual-chain errors for its encoder. Defined only where
numba is installed (HAVE_NUMBA)."""

from __future__ import annotations

import numpy as np

try:  # pragma: no cover - exercised by whichever path is installed
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    numba = None
    HAVE_NUMBA = False

_P2 = np.array([2.0 ** (e - 25) for e in range(32)])  # fp16 exponent -> scale of (1024 + f)

if HAVE_NUMBA:

    @numba.njit(cache=True, inline="always")
    def _h2f(p, off):
        """fp16 (little-endian bytes p[off], p[off+1]) -> float32, exactly."""
        h = np.int64(p[off]) | (np.int64(p[off + 1]) << 8)
        e = (h >> 10) & 0x1F
        f = h & 0x3FF
        if e == 0:
            v = f * 5.960464477539063e-08  # 2^-24
        elif e == 31:
            v = np.inf if f == 0 else np.nan
        else:
            v = (1024 + f) * _P2[e]  # table, not pow(): this runs once per group and plane
        if h & 0x8000:
            v = -v
        return np.float32(v)

    _U = np.uint64

    # one long function on purpose: a single numba kernel (split into functions, it costs a call per row)
    @numba.njit(parallel=True, cache=True)
    def _nested_matmul(planes, nbits, nscales, kind, mult, offset, n_out, n_in, group, x, xs, msym):
        """y[t, o] = sum_g C[o,g] xs[t,g] + sum_i x[t,i] * (sum_p A[p,o,g] code_p[o,i]).

        Per output row: decode each plane's row into a uint8 code row (long contiguous loops;
        matquant ORs its planes into one B-bit code row), then per group multiply-add
        x * (A * code) into `group` lanes per t. fastmath stays off: no float sum is reassociated
        (the lanes are independent accumulators, summed pairwise once per row), and indices are
        unsigned so the loops carry no negative-index wraparound code; LLVM vectorizes them.
        T > 1: a group's weights are built once into a `group`-float scratch, then used T times.
        No float copy of the matrix is made (scratch: P code rows + one group of floats)."""
        T = x.shape[0]
        G = n_in // group
        P = len(planes)
        PC = P if kind == 0 else 1  # code rows kept
        y = np.empty((T, n_out), np.float32)
        # T == 1 and every plane's row slots hold whole groups: decode inside the multiply-add
        fused = T == 1
        for p in range(P):
            if (n_in * nbits[p] // 8) % group:
                fused = False
        for o in numba.prange(n_out):
            codes = np.empty((0 if fused else PC, n_in), np.uint8)
            lane = np.zeros((T, group), np.float32)
            cf = np.empty(group, np.float32)
            Ag = np.empty((P, G), np.float32)
            cacc = np.zeros(T, np.float32)
            # ---- decode the row's codes
            for p in range(0 if fused else P):
                pl = planes[p]
                b = nbits[p]
                nr = n_in * b // 8
                st = _U(o * nr)
                mask = (1 << b) - 1
                if kind == 0:
                    dst = codes[p]
                    for j in range(8 // b):
                        sh = j * b
                        d0 = _U(j * nr)
                        for k in range(nr):
                            dst[d0 + _U(k)] = np.uint8((pl[st + _U(k)] >> sh) & mask)
                else:
                    dst = codes[0]
                    up = int(round(np.log2(mult[p])))
                    for j in range(8 // b):
                        sh = j * b
                        d0 = _U(j * nr)
                        if p == 0:
                            for k in range(nr):
                                dst[d0 + _U(k)] = np.uint8(((pl[st + _U(k)] >> sh) & mask) << up)
                        else:
                            for k in range(nr):
                                dst[d0 + _U(k)] |= np.uint8(((pl[st + _U(k)] >> sh) & mask) << up)
            # ---- per-group coefficients from the fp16 scales
            p0 = planes[0]
            soff = n_out * n_in * nbits[0] // 8
            for g in range(G):
                gi = o * G + g
                s0 = _h2f(p0, soff + 2 * gi)
                if kind == 2:  # symmetric matquant: the offset is msym * s, not stored
                    m0 = np.float32(msym) * s0
                else:
                    m0 = _h2f(p0, soff + 2 * (n_out * G) + 2 * gi)
                if kind == 0:  # d2moe: W = (m0 - sum s_p) + s0*Q0 + sum 2 s_p B_p
                    C = m0
                    Ag[0, g] = s0
                    for p in range(1, P):
                        sp = _h2f(planes[p], n_out * n_in * nbits[p] // 8 + 2 * gi)
                        Ag[p, g] = sp + sp
                        C = C - sp
                else:  # matquant: W = (m + s (d-1)/2) + s * code, code = sum_p code_p 2^up_p
                    C = m0 + s0 * np.float32(offset)
                    Ag[0, g] = s0
                    if fused:
                        for p in range(P):
                            Ag[p, g] = s0 * np.float32(mult[p])
                for t in range(T):
                    cacc[t] += C * xs[t, g]
            # ---- multiply-add (1-D row views hoisted out of the loops: they vectorize)
            if fused:
                ln = lane[0]
                xr = x[0]
                for p in range(P):
                    pl = planes[p]
                    b = nbits[p]
                    nr = n_in * b // 8
                    st = o * nr
                    mask = (1 << b) - 1
                    for j in range(8 // b):
                        sh = j * b
                        for gg in range(nr // group):
                            col0 = j * nr + gg * group
                            a = Ag[p, col0 // group]
                            b0 = _U(st + gg * group)
                            c0 = _U(col0)
                            for k in range(group):
                                i = _U(k)
                                ln[i] += xr[c0 + i] * (a * np.float32((pl[b0 + i] >> sh) & mask))
            elif T == 1:
                ln = lane[0]
                xr = x[0]
                for g in range(G):
                    c0 = _U(g * group)
                    for p in range(PC):
                        a = Ag[p, g]
                        cr = codes[p]
                        for k in range(group):
                            i = _U(k)
                            ln[i] += xr[c0 + i] * (a * np.float32(cr[c0 + i]))
            else:
                for g in range(G):
                    c0 = _U(g * group)
                    a = Ag[0, g]
                    cr = codes[0]
                    for k in range(group):
                        cf[k] = a * np.float32(cr[c0 + _U(k)])
                    for p in range(1, PC):
                        a = Ag[p, g]
                        cr = codes[p]
                        for k in range(group):
                            cf[k] += a * np.float32(cr[c0 + _U(k)])
                    for t in range(T):
                        ln = lane[t]
                        xr = x[t]
                        for k in range(group):
                            i = _U(k)
                            ln[i] += xr[c0 + i] * cf[i]
            for t in range(T):
                h = group
                while h % 2 == 0 and h > 1:  # pairwise halving while it divides evenly
                    h //= 2
                    for k in range(h):
                        lane[t, _U(k)] += lane[t, _U(k) + _U(h)]
                acc = np.float32(0.0)
                for k in range(h):
                    acc += lane[t, k]
                y[t, o] = acc + cacc[t]
        return y

    @numba.njit(parallel=True, cache=True)
    def _d2_chain_errs(W, a, s0, m0, alpha, qmax, nplanes, readable):
        n_out, G, gs = W.shape
        nw = 0
        for p in range(nplanes):
            if readable[p]:
                nw += 1
        out = np.empty((n_out, G, nw))
        for o in numba.prange(n_out):
            R = np.empty(gs)
            for g in range(G):
                s = s0[o, g]
                m = m0[o, g]
                safe = s if s != 0 else 1.0
                sa = 0.0
                for i in range(gs):
                    sa += a[g, i]
                for i in range(gs):
                    q = min(max(np.round((W[o, g, i] - m) / safe), 0.0), qmax)
                    R[i] = W[o, g, i] - np.float64(np.float32(s * q + m))
                wi = 0
                al = alpha[o, g]
                for p in range(nplanes):
                    if p:
                        sl = 0.0
                        mx = 0.0
                        for i in range(gs):
                            v = abs(R[i])
                            sl += a[g, i] * v
                            mx = max(mx, v)
                        sp = al * (sl / sa) + (1.0 - al) * 0.5 * mx
                        for i in range(gs):
                            R[i] = R[i] - sp if R[i] >= 0 else R[i] + sp
                    if readable[p]:
                        e = 0.0
                        for i in range(gs):
                            e += a[g, i] * R[i] * R[i]
                        out[o, g, wi] = e
                        wi += 1
        return out
