"""Numbers in the docs' prose, checked against the run files they come from.

    python tools/claims.py            # exit 1 and list every claim whose text is not in its file

Generated tables cannot drift (tools/report.py writes them); prose can. Each claim here is a
sentence fragment as it stands in a doc, with its numbers computed from docs/runs/*.json (top-1,
% of float, paired differences and p from tools/paired.py). A claim whose computed text is not in
the doc (whitespace aside) fails: either the prose drifted from the runs, or the runs changed and
the prose must follow. Add a claim when prose quotes a measured number.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.paired import compare, hits  # noqa: E402
from tools.report import RECON, RUNS, load  # noqa: E402

_P5, _G5 = "mptq-mp:5:allocator=pareto", "mptq-mp:5:allocator=greedy"
_P4, _G4 = "mptq-mp:4:allocator=pareto", "mptq-mp:4:allocator=greedy"
_FISHER = f"mptq:{{b}}:recon:{RECON}:recon_loss=fisher"
_FABS = f"mptq:{{b}}:recon:{RECON}:recon_loss=fisher_abs"
_MSE = f"mptq:{{b}}:recon:{RECON}"
_STAGE1 = f"ias:{{b}}:{RECON}:ias_stages=1"


def _rows():
    return {card: {r["config"]: r for r in rows} for card, rows in load(sorted(RUNS.glob("*.json"))).items()}


def _diff(rows, card, a, b) -> dict:
    return compare(hits(rows[card][b]), hits(rows[card][a]))


def pts(rows, card, a, b) -> str:
    """Paired top-1 difference of config a over config b, in points."""
    return f"{100 * _diff(rows, card, a, b)['diff']:+.2f}"


def pval(rows, card, a, b) -> str:
    return f"{_diff(rows, card, a, b)['p']:.2g}"


def rerun(card: str, file: str, config: str) -> dict:
    """A config's row from a run file of docs/runs/recon (reruns with later code, kept apart)."""
    import json
    return next(r for r in json.loads((RUNS / "recon" / f"{card}_{file}.json").read_text()) if r["config"] == config)


def vs_rerun(rows, card, a, file, b) -> dict:
    """Paired comparison of config a (run files) over config b rerun in docs/runs/recon/CARD_FILE.json."""
    return compare(hits(rerun(card, file, b)), hits(rows[card][a]))


def pct(rows, card, a) -> str:
    """Top-1 of a config as % of float."""
    return f"{100 * rows[card][a]['top1'] / rows[card]['float']['top1']:.1f}%"


# (doc, text with {} fields, the fields' values from the run files)
CLAIMS = [
    ("README.md", "level with it at 5 (deit {}, swin {} points) and ahead at 4 ({}, {})",
     lambda r: [pts(r, "deit_tiny_tin", _P5, _G5), pts(r, "swin_tiny_tin", _P5, _G5),
                pts(r, "deit_tiny_tin", _P4, _G4), pts(r, "swin_tiny_tin", _P4, _G4)]),
    ("README.md", "it gains {} / {} over fixed W4A4 (p = {}, {}: within noise on each model)",
     lambda r: [pts(r, "deit_tiny_tin", _P4, "mptq:4"), pts(r, "swin_tiny_tin", _P4, "mptq:4"),
                pval(r, "deit_tiny_tin", _P4, "mptq:4"), pval(r, "swin_tiny_tin", _P4, "mptq:4")]),
    ("README.md", "within noise on swin ({} points) but cost deit {};",
     lambda r: [pts(r, "swin_tiny_tin", "mptq:4:patchwise=1", "mptq:4").replace("-", "−"),
                pts(r, "deit_tiny_tin", "mptq:4:patchwise=1", "mptq:4").lstrip("-")]),
    ("README.md", "deit W3A3 {}, W4A4 {}, swin W3A3 {}, W4A4 {} of float",
     lambda r: [pct(r, c, _FABS.format(b=b)) for c in ("deit_tiny_tin", "swin_tiny_tin") for b in (3, 4)]),
    ("README.md", "deit W3A3 {} points (p = {}), the others within noise (swin W3A3 {}, p = {})",
     lambda r: [f"{100 * vs_rerun(r, 'deit_tiny_tin', _FABS.format(b=3), 'loss', _MSE.format(b=3))['diff']:+.2f}",
                f"{vs_rerun(r, 'deit_tiny_tin', _FABS.format(b=3), 'loss', _MSE.format(b=3))['p']:.2g}",
                f"{100 * vs_rerun(r, 'swin_tiny_tin', _FABS.format(b=3), 'loss', _MSE.format(b=3))['diff']:+.2f}"
                .replace("-", "−"),
                f"{vs_rerun(r, 'swin_tiny_tin', _FABS.format(b=3), 'loss', _MSE.format(b=3))['p']:.2g}"]),
    ("docs/results.md", "{} and {} points over the row above on deit, {} on swin W3A3; on swin W4A4 only {} (p = {})",
     lambda r: [pts(r, "deit_tiny_tin", _STAGE1.format(b=4), "uniform:4:softmax_quantizer=sulq"),
                pts(r, "deit_tiny_tin", _STAGE1.format(b=3), "uniform:3:softmax_quantizer=sulq"),
                pts(r, "swin_tiny_tin", _STAGE1.format(b=3), "uniform:3:softmax_quantizer=sulq"),
                pts(r, "swin_tiny_tin", _STAGE1.format(b=4), "uniform:4:softmax_quantizer=sulq"),
                pval(r, "swin_tiny_tin", _STAGE1.format(b=4), "uniform:4:softmax_quantizer=sulq")]),
    ("docs/journal.md", "equals Greedy MP on deit (0.4178 both, p = {}) and is {} on swin (p = {})",
     lambda r: [f"{float(pval(r, 'deit_tiny_tin', _P5, _G5)):.1f}", pts(r, "swin_tiny_tin", _P5, _G5),
                pval(r, "swin_tiny_tin", _P5, _G5)]),
]


def _flat(s: str) -> str:
    return re.sub(r"\s+", " ", s)


def check() -> list[str]:
    rows = _rows()
    bad = []
    for doc, text, values in CLAIMS:
        want = text.format(*values(rows))
        if _flat(want) not in _flat((REPO / doc).read_text()):
            bad.append(f"{doc}: expected the text {want!r} (from the run files)")
    return bad


def main() -> int:
    bad = check()
    for b in bad:
        print(b, file=sys.stderr)
    print(f"{len(CLAIMS) - len(bad)} of {len(CLAIMS)} claims match the run files")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
