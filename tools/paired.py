"""Is a top-1 difference between two configs more than chance? A paired test on the same images.

    python tools/paired.py runs/deit_s7.json --ref float --vs mptq:6 mptq:8

Reads tools/benchmark.py results (rows written with per-image hits), from one file or several
(a config in more than one: the later file's row counts). On the images where exactly
one of the two models is right (n_ref: only the reference, n_vs: only the other), the top-1
difference is (n_vs − n_ref) / images. If neither model were better, each such image would be
as likely to fall either way: the exact two-sided sign test gives p, and the paired standard
error of the difference gives a 95% interval. A target like "within 0.2 points of float" can
only be told apart from chance when the interval is narrower than that.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np


def hits(row: dict) -> np.ndarray:
    if "hits" not in row:
        raise SystemExit(f"{row['config']}: no per-image results in this file (rerun tools/benchmark.py)")
    return np.unpackbits(np.frombuffer(bytes.fromhex(row["hits"]), np.uint8))[: row["images"]].astype(bool)


def sign_test_p(k: int, n: int) -> float:
    """Two-sided exact binomial test of k successes in n trials at p = 1/2."""
    if n == 0:
        return 1.0
    lo = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(lo + 1)) / (1 << n)  # exact ints: 2.0 ** n overflows past n = 1023
    return min(1.0, 2 * tail)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Paired comparison of per-image hits `b` against the reference `a` (same images, same order)."""
    if a.shape != b.shape:
        raise ValueError(f"different image counts: {a.size} and {b.size}")
    n = a.size
    n_ref, n_vs = int((a & ~b).sum()), int((~a & b).sum())
    diff = (n_vs - n_ref) / n
    # variance of the mean of d_i = b_i − a_i ∈ {−1, 0, 1}
    var = ((n_ref + n_vs) / n - diff ** 2) / n
    half = 1.96 * math.sqrt(max(var, 0.0))
    return {"images": n, "top1_ref": a.mean(), "top1_vs": b.mean(), "only_ref": n_ref, "only_vs": n_vs,
            "diff": diff, "ci95": (diff - half, diff + half), "p": sign_test_p(n_vs, n_ref + n_vs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="JSON written by tools/benchmark.py")
    ap.add_argument("--ref", default="float", help="the config the others are compared with")
    ap.add_argument("--vs", nargs="+", required=True)
    ap.add_argument("--vs-from", help="read the --vs configs from this file instead (the same config run "
                                      "again, e.g. by another commit, against the results' one)")
    a = ap.parse_args(argv)
    rows = {}
    for path in a.results:
        for r in json.load(open(path)):
            rows[r["config"]] = r  # a config run twice: the later run counts
    vs_rows = {r["config"]: r for r in json.load(open(a.vs_from))} if a.vs_from else rows
    for c, have in [(a.ref, rows)] + [(c, vs_rows) for c in a.vs]:
        if c not in have:
            raise SystemExit(f"{c!r} is not in the files (has: {', '.join(have)})")
    ref = hits(rows[a.ref])
    for c in a.vs:
        for k in ("val", "limit"):
            if vs_rows[c].get(k) != rows[a.ref].get(k):
                raise SystemExit(f"{c} and {a.ref} were evaluated on different images ({k} differs)")
        r = compare(ref, hits(vs_rows[c]))
        lo, hi = r["ci95"]
        print(f"{c} vs {a.ref} on {r['images']} images: top-1 {r['top1_vs']:.4f} vs {r['top1_ref']:.4f}, "
              f"difference {100 * r['diff']:+.2f} points (95% interval {100 * lo:+.2f} to {100 * hi:+.2f}); "
              f"right only with {c}: {r['only_vs']}, only with {a.ref}: {r['only_ref']}; sign test p = {r['p']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
