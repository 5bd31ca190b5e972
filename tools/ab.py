"""One conversion at another commit against the working tree, one after the other, on an idle
machine: wall time, peak memory, each pass's seconds and the model's sha256 (issue 24's speed-up
was measured so).

    python tools/ab.py --ref 6276bee --args "--recipe mptq --wbits 4 --abits 4 --reconstruct --iters 30" \
        --variants "" "--threads 1" --out docs/runs/recon_speed.json

Runs `python -m mptq_onnx convert` on the card's float export with tin_calib, at --ref (checked out
into a temporary git worktree) with the first variant, then in the working tree with each variant.
The same sha256 means byte-identical models. `--table FILE` prints the Markdown table of such a
file's rows (docs/results.md's is made so).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.specs import float_model  # noqa: E402


def run(tree: Path, model: Path, calib: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "mptq_onnx", "convert", str(model), "--calib",
           str(calib), "-o", str(out), "--force", "-q", *args]
    p = subprocess.run(cmd, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    wall, rss = p.stderr.strip().splitlines()[-1].split()
    rep = json.loads(out.with_suffix(".report.json").read_text())
    return {"wall_s": float(wall), "max_rss_gb": round(int(rss) / 2**20, 2),
            "passes": {x["pass"]: x["seconds"] for x in rep["passes"]},
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()[:16]}


def table(rows: list[dict], pass_name: str = "reconstruct") -> str:
    base = rows[0]["passes"].get(pass_name)
    out = [f"| tree | options | wall s | {pass_name} s | x faster | peak GB | model sha256 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["passes"].get(pass_name)
        ratio = f"{base / t:.2f}" if base and t else "-"
        out.append(f"| {r['tree']} | `{r['args']}` | {r['wall_s']:.1f} | {t} | {ratio} | {r['max_rss_gb']:.2f} | "
                   f"`{r['sha256']}` |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if "--table" in (argv if argv is not None else sys.argv[1:]):
        ap.add_argument("--table", required=True)
        ap.add_argument("--pass-name", default="reconstruct")
        a = ap.parse_args(argv)
        print(table([json.loads(ln) for ln in Path(a.table).read_text().splitlines() if ln.strip()], a.pass_name), end="")
        return 0
    ap.add_argument("--ref", required=True, help="the commit to compare with (e.g. the landed one)")
    ap.add_argument("--card", default="deit_tiny_tin")
    ap.add_argument("--args", required=True, help="convert's options, quoted")
    ap.add_argument("--variants", nargs="*", default=[""], help="more options per working-tree run")
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--work", default=str(REPO / "runs"))
    ap.add_argument("--out", help="append the rows (JSON lines)")
    a = ap.parse_args(argv)
    model = float_model(a.card, Path(a.shared), Path(a.work))
    calib = Path(a.shared) / "data" / "tin_calib"
    base = shlex.split(a.args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wt = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(wt), a.ref], check=True)
        try:
            ref_sha = subprocess.run(["git", "-C", str(wt), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, check=True).stdout.strip()
            jobs = [(wt, f"ref {ref_sha}", shlex.split(a.variants[0]) if a.variants else [])]
            jobs += [(REPO, "working tree", shlex.split(v)) for v in a.variants]
            for i, (tree, label, extra) in enumerate(jobs):
                r = run(tree, model, calib, base + extra, Path(tmp) / f"m{i}.onnx")
                r.update(tree=label, card=a.card, args=" ".join(base + extra))
                rows.append(r)
                slow = ", ".join(f"{k} {v:.1f}" for k, v in r["passes"].items() if v >= 1)
                print(f"{label:14s} {' '.join(extra) or '(as given)':14s} wall {r['wall_s']:6.1f} s  "
                      f"peak {r['max_rss_gb']:.2f} GB  sha {r['sha256']}  ({slow})", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], check=False)
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
