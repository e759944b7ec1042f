#!/usr/bin/env python3
"""Reference figures for finelens's WeightWatcher-style spectral analysis (finelens_drift::spectrum).

    ~/.cache/peer-venv/bin/python scripts/spectrum_reference.py

writes fixtures/spectra/reference.json: a few small weight matrices generated with numpy (seeded)
— Gaussian noise, a matrix with a power-law spectrum (W = U diag(sqrt(lambda)) V^T, lambda drawn
from a Pareto law with alpha = 3), and Gaussian noise with one planted large element — and, for
each, the eigenvalues of W^T W (numpy.linalg.eigvalsh), the power-law fit of their tail by
Clauset, Shalizi & Newman's procedure (MLE alpha for every candidate xmin with at least 10 values
in the tail, the xmin with the smallest Kolmogorov-Smirnov distance D = max |F_fit(x_k) - k/n|
over the tail's sorted values, as the `powerlaw` package computes it) written here in numpy, and,
when `powerlaw` is installed, its `Fit(evals)` for comparison — it agrees except where its default
parameter range (alpha within [0, 3]) drops candidates, which WeightWatcher's reading (alpha up
to 6 and beyond) cannot use; plus the Marchenko-Pastur soft rank. finelens's test reads the matrices and compares.
Needs numpy (and optionally powerlaw).
"""
import json
from pathlib import Path

import numpy as np

MIN_TAIL = 10


def fit(values):
    x = np.sort(values[values > 0])
    best = None
    for xmin in np.unique(x):
        tail = x[x >= xmin]
        n = len(tail)
        if n < MIN_TAIL:
            break
        logs = np.log(tail / xmin).sum()
        if logs <= 0:
            continue
        alpha = 1 + n / logs
        f = 1 - (tail / xmin) ** (1 - alpha)
        k = np.arange(n)
        ks = np.abs(f - k / n).max()
        if best is None or ks < best["ks"]:
            best = dict(alpha=float(alpha), xmin=float(xmin), tail=int(n), ks=float(ks))
    return best


def soft_rank(w, evals):
    n, m = max(w.shape), min(w.shape)
    edge = n * w.var() * (1 + np.sqrt(m / n)) ** 2
    return float(edge / evals.max())


def main():
    rng = np.random.default_rng(2026)
    cases = {}
    cases["gaussian"] = rng.standard_normal((80, 50)).astype(np.float32)
    m, n = 60, 90
    u, _ = np.linalg.qr(rng.standard_normal((n, m)))
    v, _ = np.linalg.qr(rng.standard_normal((m, m)))
    lam = (1 - rng.random(m)) ** (-1 / (3 - 1))  # Pareto, alpha = 3, xmin = 1
    cases["power_law"] = (u @ np.diag(np.sqrt(lam)) @ v.T).astype(np.float32)
    spiked = rng.standard_normal((70, 40)).astype(np.float32)
    spiked[3, 7] = 60.0
    cases["spiked"] = spiked
    out = {"min_tail": MIN_TAIL, "numpy": np.__version__, "cases": []}
    try:
        import powerlaw
        out["powerlaw"] = powerlaw.__version__
    except ImportError:
        powerlaw = None
    for name, w in cases.items():
        w64 = w.astype(np.float64)
        evals = np.linalg.eigvalsh(w64.T @ w64 if w.shape[0] >= w.shape[1] else w64 @ w64.T)
        case = dict(name=name, rows=w.shape[0], cols=w.shape[1], matrix=w.ravel().tolist(),
                    eigenvalues=evals.tolist(), fit=fit(evals), mp_soft_rank=soft_rank(w64, evals))
        if powerlaw is not None:
            f = powerlaw.Fit(evals[evals > 0], verbose=False)
            case["powerlaw_package"] = dict(alpha=float(f.alpha), xmin=float(f.xmin), ks=float(f.D))
        out["cases"].append(case)
    path = Path(__file__).resolve().parent.parent / "fixtures/spectra/reference.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    for c in out["cases"]:
        print(c["name"], c["fit"], c.get("powerlaw_package"), "soft rank", round(c["mp_soft_rank"], 3))


if __name__ == "__main__":
    main()
