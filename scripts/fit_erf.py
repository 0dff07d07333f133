#!/usr/bin/env python3
"""Fits the rational erf of crates/wuerstchen/src/kernels/gelu.rs.

erf(x) ~ x P(x^2) / Q(x^2) on [0, 4] with Q(0) = 1, P and Q of degree 5: linear least
squares on the absolute error, reweighted by Lawson's iteration towards the minimax
fit. Prints the f32 coefficients and the error of their f32 evaluation (Horner, as the
kernel does) over [-6, 6]. Needs numpy and torch (for a float64 erf).

    python scripts/fit_erf.py
"""
import numpy as np
import torch

DEG, X = 6, 4.0  # coefficients per polynomial, clamp


def erf(a):
    return torch.special.erf(torch.tensor(a, dtype=torch.float64)).numpy()


def fit(n=DEG, iterations=60):
    x = np.unique(np.concatenate([np.linspace(0, X, 8000),
                                  X * (1 - np.cos(np.linspace(0, np.pi / 2, 8000)))]))[1:]
    t, y = x * x, erf(x)
    f = y / x
    q = np.array([1.0])
    lw = np.ones_like(x)
    for it in range(iterations):
        qt = np.polyval(q[::-1], t)
        # x (P - f Q) / Q_prev is linear in the unknowns and ~ the absolute error
        a = np.concatenate([t[:, None] ** np.arange(n),
                            -f[:, None] * t[:, None] ** np.arange(1, n)], axis=1) * (x / qt)[:, None]
        c, *_ = np.linalg.lstsq(a * np.sqrt(lw)[:, None], f * x / qt * np.sqrt(lw), rcond=None)
        p, q = c[:n], np.concatenate([[1.0], c[n:]])
        err = np.abs(x * np.polyval(p[::-1], t) / np.polyval(q[::-1], t) - y)
        if it > 5:  # Lawson: weight the points where the error is largest
            lw = lw * (err / err.max() + 1e-3)
            lw /= lw.sum()
    return p.astype(np.float32), q.astype(np.float32), err.max()


def f32_error(p, q):
    xs = np.linspace(-6, 6, 2400001).astype(np.float32)
    xc = np.clip(xs, np.float32(-X), np.float32(X))
    t = xc * xc
    pp, qq = np.zeros_like(t), np.zeros_like(t)
    for a in p[::-1]:
        pp = (pp * t + a).astype(np.float32)
    for a in q[::-1]:
        qq = (qq * t + a).astype(np.float32)
    e = np.clip(xc * pp / qq, -1, 1).astype(np.float32)
    return np.abs(e - erf(xs.astype(np.float64))).max()


if __name__ == "__main__":
    p, q, e64 = fit()
    print("P", [float(v) for v in p])
    print("Q", [float(v) for v in q])
    print(f"max |error|: {e64:.2e} in float64, {f32_error(p, q):.2e} evaluated in float32")
