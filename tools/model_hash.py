"""sha256 of converted models and the time of each pass, to check that a change leaves the output
byte-identical (run it at two commits, e.g. in a `git worktree`) and what it did to the time.

    python tools/model_hash.py --card swin_tiny_tin --configs mptq-mp:5 mptq:4

Calibrates on 128 images of ../shared/data/tin_calib; exports the card to --work if needed.
Config syntax: tools/specs.py.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mptq_onnx.convert import convert  # noqa: E402
from mptq_onnx.data import load_calibration  # noqa: E402
from mptq_onnx.modelio import get_preprocess, load_model  # noqa: E402
from tools.specs import conversion_config, float_model, pass_times  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", required=True)
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--work", default=str(REPO / "runs"))
    a = ap.parse_args(argv)
    float_path = float_model(a.card, Path(a.shared), Path(a.work))
    calib = load_calibration(Path(a.shared) / "data" / "tin_calib", get_preprocess(load_model(float_path)), 128,
                             progress=False)
    for spec in a.configs:
        cfg = conversion_config(spec)
        t = time.perf_counter()
        ctx = convert(load_model(float_path), calib, cfg, verbose=False)
        dt = time.perf_counter() - t
        digest = hashlib.sha256(ctx.model.SerializeToString()).hexdigest()[:16]
        print(f"{a.card} {spec}: sha256 {digest}  {dt:.1f} s ({pass_times(ctx.report)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
