"""PMQ's Pareto frontier: the least total sensitivity at every average bit-width, exactly.

Choosing one width per quantizer under an average-bits budget is a multiple-choice knapsack.
Dynamic programming over the budget, discretized to 1/`grid` of a bit of the average, solves it
for every budget at once: best[c] = the least Σ Ω with the widths' extra cost at most c. One run
gives the whole frontier, so each further --target-bits is a look-up. Rounding each quantizer's
cost to the grid can move the true average by at most (quantizers / 2 / grid) bits; a budget is
read off at the largest grid cell whose *true* average meets it, so the target always holds.
Weights and activations have budgets of their own (Greedy MP's two averages) and, with additive
Ω, separate problems.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Frontier:
    """The DP of one quantizer type (weights or activations)."""
    cands: list[int]
    shares: np.ndarray          # [K] each quantizer's share of the average
    omega: np.ndarray           # [K, B] Ω of quantizer k at cands[j]
    grid: int
    base: int                   # the all-lowest configuration's cost, in grid units
    dcost: np.ndarray           # [K, B] extra cost of cands[j] over the lowest, in grid units
    best: np.ndarray            # [C + 1] least Σ Ω with extra cost <= c
    choice: np.ndarray          # [K, C + 1] the width index quantizer k takes at budget c

    def config(self, c: int) -> np.ndarray:
        """Width indices (into cands) of the optimum at grid budget c."""
        c = int(min(max(c, 0), len(self.best) - 1))
        out = np.zeros(len(self.shares), np.int64)
        for k in range(len(self.shares) - 1, -1, -1):
            j = int(self.choice[k, c])
            out[k] = j
            c -= int(self.dcost[k, j])
        return out

    def average(self, idx: np.ndarray) -> float:
        return float(np.dot(self.shares, np.asarray(self.cands, np.float64)[idx]))

    def total(self, idx: np.ndarray) -> float:
        return float(self.omega[np.arange(len(idx)), idx].sum())

    def at(self, target: float) -> np.ndarray:
        """The least-Ω widths whose true average is at most `target` (the lowest widths if none is)."""
        c = int(np.floor((target * self.grid - self.base) + 1e-9))
        c = min(c, len(self.best) - 1)
        while c > 0:
            idx = self.config(c)
            if self.average(idx) <= target + 1e-9:
                return idx
            c -= 1
        return self.config(0)


def solve(cands: list[int], shares: np.ndarray, omega: np.ndarray, grid: int = 4096) -> Frontier:
    """The multiple-choice knapsack's DP (see the module doc). `omega[k, j]`: Ω of quantizer k at
    cands[j]; `shares[k]`: its weight in the average."""
    cands = list(cands)
    shares = np.asarray(shares, np.float64)
    omega = np.asarray(omega, np.float64)
    k_n, b_n = omega.shape
    assert b_n == len(cands) and len(shares) == k_n
    lo = min(cands)
    cost = shares[:, None] * np.asarray(cands, np.float64)[None, :] * grid  # [K, B] in grid units
    dcost = np.rint(cost - shares[:, None] * lo * grid).astype(np.int64)
    base = int(np.rint(shares.sum() * lo * grid))
    cap = int(dcost.max(axis=1).sum()) if k_n else 0
    best = np.zeros(cap + 1)
    choice = np.zeros((k_n, cap + 1), np.int8)
    for k in range(k_n):
        nxt = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, np.int8)
        for j in range(b_n):
            d = int(dcost[k, j])
            cand = np.full(cap + 1, np.inf)
            cand[d:] = best[:cap + 1 - d] + omega[k, j]
            better = cand < nxt
            nxt[better] = cand[better]
            arg[better] = j
        best, choice[k] = nxt, arg
    return Frontier(cands, shares, omega, grid, base, dcost, best, choice)
