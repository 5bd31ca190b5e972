"""Time and peak memory of `convert` on a (large) model, next to onnxruntime's `quantize_static`.

    python tools/scale.py --model vit_base.onnx --calib ../shared/data/tin_calib \
        --configs uniform:8 mptq:4 --ort 8 4 [--calib-size 128] [--per-pass]

Each run is a child process (this script with --child), so its peak RSS is its own: the parent
reads it from os.wait4's rusage. A conversion runs as `mptq-onnx convert` does (cli.run_convert
given the model's path: the float model is read inside the conversion, and the result checked).
Images are read inside the child as the CLI reads them (streamed from a folder or a
memory-mapped .npy; quantize_static gets them loaded, as its tool does). The table gives model,
config, wall seconds (the child's whole life), convert seconds (run_convert: reading, the passes,
the result check and the save; for quantize_static, its call), peak RSS in GB (10^9 bytes) and
convert seconds over quantize_static's at the same bits (W=A configs, when --ort ran them);
--per-pass adds each step's seconds, the highest RSS sampled (every 20 ms) since the previous
step ended (load: reading the model and opening the images; a pass's float check counts in the
next step) and the process's peak so far (VmHWM: the sampler, a Python thread, misses peaks
inside calls that hold the GIL). Run it on an otherwise idle machine. Config syntax: tools/specs.py; --ort BITS runs
quantize_static W<BITS>A<BITS> MinMax (tools/ort_baseline.py) on the same images.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    """The kernel's peak RSS of this process so far (VmHWM): unlike the sampler, it sees peaks
    inside calls that hold the GIL."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class _Sampler:
    """Highest RSS since the last `take()`, sampled in a thread."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, _rss())

    def take(self) -> int:
        p, self.peak = max(self.peak, _rss()), _rss()
        return p

    def stop(self):
        self._stop.set()
        self._t.join()


def child(a) -> int:
    import logging
    from mptq_onnx.data import load_calibration
    from mptq_onnx.modelio import get_preprocess, load_model
    out = Path(a.out)
    res: dict = {}
    sampler = _Sampler()
    if a.config.startswith("ort:"):
        from tools.ort_baseline import ort_quantize_static
        logging.getLogger().setLevel(logging.ERROR)
        bits = int(a.config.split(":")[1])
        images = load_calibration(a.calib, get_preprocess(load_model(a.model, load_external=False)),
                                  a.calib_size, progress=False)
        res["seconds"] = ort_quantize_static(a.model, images, out, bits, bits, "MinMax")
    else:  # the CLI's path (`mptq-onnx convert`: run_convert given the model's path), step by step
        import mptq_onnx.convert as conv
        import mptq_onnx.modelio as mio
        from mptq_onnx.cli import run_convert
        from tools.specs import conversion_config
        cfg = conversion_config(a.config)
        cfg.calib_size = a.calib_size
        cfg.validate()
        steps: list = []

        def step(name, fn):
            def call(*args, **kw):
                if not steps:  # reading the model and opening the images
                    steps.append(["load", round(time.perf_counter() - t0, 2), round(sampler.take() / 1e9, 2),
                                  round(_hwm() / 1e9, 2)])
                t = time.perf_counter()
                r = fn(*args, **kw)
                # the highest RSS since the previous step ended (a float check after a pass included)
                steps.append([name, round(time.perf_counter() - t, 2), round(sampler.take() / 1e9, 2),
                              round(_hwm() / 1e9, 2)])
                return r
            return call

        class Timed:
            def __init__(self, p):
                self.name, self.preserves_float, self.run = p.name, p.preserves_float, step(p.name, p)

            def __call__(self, ctx):
                return self.run(ctx)

        recipe_passes = conv.recipe_passes
        conv.recipe_passes = lambda c: [Timed(p) for p in recipe_passes(c)]
        conv.check_result = step("check", conv.check_result)
        mio.save_model = step("save", mio.save_model)
        sampler.take()
        t0 = time.perf_counter()
        run_convert(Path(a.model), None, a.calib, cfg, out, True, out.with_suffix(".report.json"))
        res["seconds"] = time.perf_counter() - t0
        res["passes"] = steps
    sampler.stop()
    print("SCALE " + json.dumps(res))
    return 0


def run_child(model: str, config: str, calib: str, calib_size: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--config", config, "--calib", calib,
           "--calib-size", str(calib_size), "--out", str(out)]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    text = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": f"exit {os.waitstatus_to_exitcode(status)}", "wall": wall, "peak_gb": ru.ru_maxrss * 1024 / 1e9}
    line = [ln for ln in text.splitlines() if ln.startswith("SCALE ")][-1]
    return {**json.loads(line[6:]), "wall": wall, "peak_gb": ru.ru_maxrss * 1024 / 1e9}  # ru_maxrss: KiB on Linux; GB: 10^9 bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="float ONNX model")
    ap.add_argument("--calib", required=True, help="ImageFolder or .npy/.npz")
    ap.add_argument("--configs", nargs="*", default=["uniform:8"])
    ap.add_argument("--ort", nargs="*", type=int, default=[], help="quantize_static W<b>A<b> MinMax runs")
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--per-pass", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    name = Path(a.model).stem
    print(f"{'model':<16} {'config':<18} {'images':>6} {'wall s':>7} {'convert s':>9} {'peak RSS GB':>11} "
          f"{'/ ort time':>10}")
    ort_s: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="scale_") as tmp:
        for cfg in [f"ort:{b}" for b in a.ort] + list(a.configs):
            r = run_child(a.model, cfg, a.calib, a.calib_size, Path(tmp) / "out.onnx")
            ratio = ""
            if cfg.startswith("ort:"):
                label = f"quantize_static:{cfg[4:]}"
                if "seconds" in r:
                    ort_s[int(cfg[4:])] = r["seconds"]
            else:
                from tools.specs import conversion_config
                label, c = cfg, conversion_config(cfg)
                if c.target_bits is None and c.wbits == c.abits and c.wbits in ort_s and "seconds" in r:
                    ratio = f"x{r['seconds'] / ort_s[c.wbits]:.2f}"  # convert time over quantize_static's
            conv = f"{r['seconds']:9.1f}" if "seconds" in r else f"{r.get('error', ''):>9}"
            print(f"{name:<16} {label:<18} {a.calib_size:>6} {r['wall']:7.1f} {conv} {r['peak_gb']:11.2f} {ratio:>10}",
                  flush=True)
            if a.per_pass and r.get("passes"):
                print("    " + ", ".join(f"{n} {s:.1f} s / {m:.2f} GB (peak so far {h:.2f})"
                                        for n, s, m, h in r["passes"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
