"""Foreign graphs: which passes act on how many sites when the same architecture arrives from
another exporter (issue 27). Builds small random-weight Hugging Face ViT/DeiT/Swin
(`make_hf_dir`: biases and LayerNorm parameters jittered), exports each with TorchScript (what
optimum uses) and dynamo, and a timm DeiT with plain torch.onnx.export (TorchScript, opset 17)
beside our own export of it; converts each with `mptq` W4A4 on the embedded calibration images
and records, per pass, the sites it acted on (the report's "sites") and the check's agreement.

    python tools/foreign.py --json docs/runs/foreign/foreign.json --write docs/foreign.md
    python tools/foreign.py --extra /path/to/optimum/vit/model.onnx --extra-size 64   # other exports too

Needs the export and hf extras. Takes about 2 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYERS = {"vit": 2, "deit": 2, "swin": 4}
PASSES = ("canonicalize", "attn-smooth", "sq-b", "opt-m", "rounding", "qdq")


def make_hf_dir(family: str, out: Path, size: int = 32) -> Path:
    """A small random transformers image classifier saved with save_pretrained. vit: a
    preprocessor_config.json (mean = std = 0.5) and named classes; deit: resize then crop, ImageNet
    statistics; swin: no preprocessor config."""
    import torch
    import transformers as tf

    common = dict(num_labels=10, image_size=size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if family == "vit":
            m = tf.ViTForImageClassification(tf.ViTConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
                id2label={i: f"class_{chr(97 + i)}" for i in range(10)}, **common))
        elif family == "deit":
            m = tf.DeiTForImageClassification(tf.DeiTConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
                **common))
        else:
            m = tf.SwinForImageClassification(tf.SwinConfig(
                embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, patch_size=4, **common))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # trained-like: no zero biases, no unit gains
            for n, p in m.named_parameters():
                if n.endswith("bias") or "norm" in n.lower():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    d = out / family
    m.save_pretrained(d)
    if family == "vit":
        tf.ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(d)
    elif family == "deit":
        tf.DeiTImageProcessor(size={"height": size + 4, "width": size + 4}, crop_size={"height": size, "width": size},
                              image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(d)
    return d


def timm_ts17(path: Path, size: int = 32) -> Path:
    """timm deit_tiny (fresh weights: Identity-shared initializers) by plain torch.onnx.export."""
    import timm
    import torch
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", img_size=size, num_classes=10).eval()
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    with torch.no_grad():
        torch.onnx.export(m, (torch.randn(2, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def convert_row(label: str, model: Path, work: Path, *extra: str) -> dict:
    from mptq_onnx.cli import main
    from mptq_onnx.embedded import embedded_calib_dir
    import contextlib
    import io
    out = work / f"{label.replace(' ', '_').replace('/', '_')}.q.onnx"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["convert", str(model), "-o", str(out), "--calib", str(embedded_calib_dir()), "--calib-size", "32",
                   "--recipe", "mptq", "--wbits", "4", "--abits", "4", "-q", "--force", *extra])
    if rc != 0:
        last = [ln for ln in err.getvalue().splitlines() if ln.strip()][-1:] or [""]
        return {"model": label, "error": f"exit {rc}: {last[0][:160]}"}
    rep = json.loads(out.with_suffix(".report.json").read_text())
    canon = next(p for p in rep["passes"] if p["pass"] == "canonicalize")
    return {"model": label, "roles": canon["summary"].split("(", 1)[1].split(")")[0],
            "sites": {p["pass"]: p["sites"] for p in rep["passes"] if p["pass"] in PASSES},
            "agreement": rep["check"]["top1_agreement"]}


def table(rows: list[dict]) -> str:
    head = "| export | roles found | " + " | ".join(PASSES) + " | top-1 agreement |"
    out = [head, "|" + "---|" * (len(PASSES) + 3)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['error']} |" + " |" * (len(PASSES) + 1))
            continue
        out.append(f"| {r['model']} | {r['roles']} | " + " | ".join(str(r["sites"].get(p, "-")) for p in PASSES)
                   + f" | {r['agreement']:.3f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--write", help="replace the table between the foreign markers of this Markdown file")
    ap.add_argument("--extra", nargs="*", default=[], help="more ONNX files to convert (e.g. optimum exports)")
    ap.add_argument("--extra-size", type=int, help="--size for the --extra models (where their graph leaves it open)")
    a = ap.parse_args(argv)
    from mptq_onnx.exporter import export_model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for fam in ("vit", "deit", "swin"):
            d = make_hf_dir(fam, work)
            for exporter in ("torchscript", "dynamo"):
                onnx_path = export_model(str(d), work / f"{fam}_{exporter}.onnx", exporter=exporter, log=None)
                rows.append(convert_row(f"HF {fam}, {exporter}", onnx_path, work))
        ours = export_model("deit_tiny_patch16_224", work / "deit_ours.onnx", img_size=32, num_classes=10, log=None)
        rows.append(convert_row("timm deit_tiny, mptq-onnx export", ours, work))
        rows.append(convert_row("timm deit_tiny, torch.onnx.export ts17", timm_ts17(work / "deit_ts17.onnx"), work,
                                "--size", "32"))
        for p in a.extra:
            label = "/".join(Path(p).parts[-3:])
            rows.append(convert_row(f"extra: {label}", Path(p), work,
                                    *(["--size", str(a.extra_size)] if a.extra_size else [])))
    print(table(rows), end="")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    if a.write:
        f = Path(a.write)
        text = f.read_text()
        begin, end = "<!-- foreign:begin (tools/foreign.py) -->", "<!-- foreign:end -->"
        head, rest = text.split(begin, 1)
        f.write_text(f"{head}{begin}\n{table(rows)}{end}{rest.split(end, 1)[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
