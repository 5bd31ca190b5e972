"""The Pareto frontier as a picture (the `plot` extra: matplotlib)."""
from __future__ import annotations

import io

from .errors import MptqError


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise MptqError("--frontier-plot needs matplotlib: pip install 'mptq-onnx[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    matplotlib.rcParams["svg.hashsalt"] = "mptq"
    return plt


def plot_frontier(points: list[dict], title: str = "") -> bytes:
    """PNG bytes: Σ Ω (and the measured KL where known) against the average bits and the GBOPs
    per image, the chosen point marked."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    x_bits = [(p["avg_w_bits"] + p["avg_a_bits"]) / 2 for p in points]
    for a, xs, xl in ((ax[0], x_bits, "average bits (mean of weights' and activations')"),
                      (ax[1], [p["gbops"] for p in points], "GBOPs per image")):
        a.plot(xs, [p["omega"] for p in points], "o-", ms=3, label="frontier: Σ Ω (predicted KL)")
        kl = [(x, p["kl"]) for x, p in zip(xs, points) if "kl" in p]
        if kl:
            a.plot(*zip(*kl), "s", color="tab:orange", label="measured KL to float")
        ch = [(x, p) for x, p in zip(xs, points) if p.get("chosen")]
        for x, p in ch:
            a.axvline(x, color="grey", lw=0.8, ls="--")
            a.plot([x], [p["omega"]], "*", ms=12, color="tab:red", label=f"chosen (target {p['target']:g})")
        a.set_yscale("log")
        a.set_xlabel(xl)
        a.grid(alpha=0.3)
    ax[0].set_ylabel("KL to float (calibration images)")
    ax[0].legend(fontsize=8)
    fig.suptitle(title or "mptq-onnx: PMQ frontier")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same bytes each run
    plt.close(fig)
    return buf.getvalue()
