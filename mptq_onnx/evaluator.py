"""Top-1 / top-5 accuracy of an ONNX classifier on an ImageFolder, with onnxruntime on CPU."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .data import ImageFolder, iter_batches, spread_indices
from .errors import MptqError
from .modelio import Preprocess, get_metadata, get_preprocess, load_model
from .runtime import first_line
from .runtime import make_session as _runtime_session

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def make_session(model: str | os.PathLike | onnx.ModelProto, threads: int | None = None,
                 providers=None) -> ort.InferenceSession:
    """An InferenceSession with all graph optimizations (on the CPU unless `providers` say otherwise).

    A path is opened by onnxruntime itself (so external-data files next to it are found);
    a ModelProto is serialized in memory.
    """
    if isinstance(model, onnx.ModelProto):
        return _runtime_session(model, threads=threads, providers=providers, what="the in-memory model")
    p = Path(model)
    if not p.is_file():
        raise MptqError(f"ONNX file not found: {p}")
    return _runtime_session(p, threads=threads, providers=providers, what=str(p))


@dataclasses.dataclass
class EvalResult:
    top1: float
    top5: float | None  # None when the model has fewer than 5 outputs
    images: int
    images_per_s: float  # images / seconds inside session.run (inference only)
    seconds: float  # total wall time, decoding included
    hits: np.ndarray | None = dataclasses.field(default=None, repr=False)  # top-1 right, per image in order

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "hits"}

    def __str__(self) -> str:
        t5 = "n/a" if self.top5 is None else f"{self.top5:.4f}"
        return (f"top1 {self.top1:.4f}  top5 {t5}  on {self.images} images  "
                f"({self.images_per_s:.1f} img/s inference, {self.seconds:.1f} s total)")


def class_names(model: onnx.ModelProto, model_path=None) -> tuple[list[str] | None, str | None]:
    """(the model's class names, where from): its metadata (`export` writes them from a card, as
    folder names, or from a Hugging Face config's `id2label`), else the `id2label` of a Hugging
    Face config.json beside the model file (what optimum writes beside model.onnx)."""
    from .exporter import CLASS_NAMES_FROM_KEY, CLASS_NAMES_KEY, HF_MODEL_CONFIG, hf_class_names

    raw = get_metadata(model, CLASS_NAMES_KEY)
    if raw:
        return json.loads(raw) or None, get_metadata(model, CLASS_NAMES_FROM_KEY) or "card"
    if model_path is not None:
        cfg = Path(model_path).parent / HF_MODEL_CONFIG
        if cfg.is_file():
            try:
                return hf_class_names(json.loads(cfg.read_text())), "id2label"
            except (OSError, ValueError):
                pass
    return None, None


def folder_labels(model: onnx.ModelProto, folders: list[str], data_dir, model_path=None,
                  log=None) -> np.ndarray:
    """The model's class index for each class folder (in ImageFolder's sorted order).

    With class names (`class_names`) each folder is looked up by name, so a subset of the
    classes is scored correctly and a foreign folder is an error. Hugging Face labels are words
    ("tabby cat"), which folders (wnids) seldom bear: when no folder bears one and the counts
    agree, the folders are taken by position, and `log` says so. With only a class count, the folders must be
    exactly that many (ImageFolder numbers them by position, so any other count would pair
    images with the wrong labels).
    """
    from .exporter import NUM_CLASSES_KEY

    names, whence = class_names(model, model_path)
    if names:
        index = {n: i for i, n in enumerate(names)}
        unknown = [f for f in folders if f not in index]
        if whence == "id2label" and unknown and len(unknown) == len(folders) and len(folders) == len(names):
            (log or (lambda m: print(m, file=sys.stderr)))(
                f"mptq-onnx: note: no class folder in {data_dir} is named like a class of the model (e.g. "
                f"{names[0]!r}); labelling the {len(folders)} folders by their sorted position")
            return np.arange(len(folders), dtype=np.int64)
        if unknown:
            raise MptqError(f"{len(unknown)} of the {len(folders)} class folders in {data_dir} are not classes of "
                            f"this model (e.g. {unknown[0]!r}; the model's classes are e.g. "
                            f"{', '.join(repr(n) for n in names[:3])}): wrong data folder, or renamed folders")
        return np.asarray([index[f] for f in folders], dtype=np.int64)
    n = get_metadata(model, NUM_CLASSES_KEY)
    if n and n.isdigit() and int(n) > 0 and int(n) != len(folders):
        raise MptqError(f"{data_dir} has {len(folders)} class folders but the model has {n} classes; images "
                        "are labelled by the position of their folder in sorted order, so every class folder "
                        "must be there (re-export with class names to score a subset)")
    return np.arange(len(folders), dtype=np.int64)


def _static(d) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def evaluate(model: str | os.PathLike | onnx.ModelProto, data_dir: str | os.PathLike,
             batch_size: int = 64, limit: int | None = None, progress: bool = True,
             preprocess: Preprocess | None = None, threads: int | None = None, overrides=None,
             providers=None) -> EvalResult:
    """Accuracy of `model` (first input: images NCHW, first output: logits) on an ImageFolder.

    `limit` evaluates an evenly spread subset (all classes covered).  The preprocessing comes
    from the model's metadata unless `preprocess` is given; with `overrides` (the CLI's flags,
    a preprocess.PreprocessOverrides) it is resolved as `convert` resolves it (preprocess.resolve).
    """
    t_start = time.perf_counter()
    if batch_size < 1:
        raise MptqError(f"batch size must be at least 1, got {batch_size}")
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model, load_external=False)
    if preprocess is None and overrides is not None:
        from .preprocess import resolve
        preprocess, _ = resolve(proto, None if isinstance(model, onnx.ModelProto) else model, overrides)
    elif preprocess is None:
        preprocess = get_preprocess(proto)
    sess = make_session(model, threads=threads, providers=providers)
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    shape = list(inp.shape)
    if len(shape) != 4:
        raise MptqError(f"the model's first input {inp.name!r} has shape {shape}; expected an image batch [N, C, H, W]")
    want = tuple(int(v) for v in preprocess.input_size)
    for got, exp, axis in zip(shape[1:], want, ("channels", "height", "width")):
        if _static(got) is not None and got != exp:
            raise MptqError(f"the model's input {inp.name!r} has shape {shape} but the preprocessing "
                            f"produces {list(want)} images ({axis} differ)")
    in_dtype = _ORT_DTYPES.get(inp.type)
    if in_dtype is None:
        raise MptqError(f"the model's input {inp.name!r} has type {inp.type}; expected a float tensor")
    fixed_batch = _static(shape[0])
    if fixed_batch is not None:
        batch_size = fixed_batch  # feed what the graph accepts; the last batch is padded

    ds = ImageFolder(data_dir, preprocess)
    n_classes = len(ds.classes)
    out_classes = _static(out.shape[-1]) if out.shape else None
    if out_classes is not None and out_classes < n_classes:
        raise MptqError(f"the model outputs {out_classes} classes but {data_dir} has {n_classes} class folders")
    label_of = folder_labels(proto, ds.classes, data_dir,
                             None if isinstance(model, onnx.ModelProto) else model)

    indices = spread_indices(len(ds), limit)
    correct5 = images = 0
    hits = []
    infer_s = 0.0
    k = 5
    n_out = n_bad = 0
    for x, y in iter_batches(ds, batch_size, indices, progress="eval" if progress else None):
        y = label_of[y]
        n = x.shape[0]
        if fixed_batch is not None and n < fixed_batch:
            x = np.concatenate([x, np.repeat(x[-1:], fixed_batch - n, axis=0)])
        t0 = time.perf_counter()
        try:
            logits = sess.run([out.name], {inp.name: x.astype(in_dtype, copy=False)})[0]
        except Exception as e:
            raise MptqError(f"onnxruntime failed to run the model: {first_line(e)}") from None
        infer_s += time.perf_counter() - t0
        logits = np.asarray(logits, dtype=np.float32).reshape(logits.shape[0], -1)[:n]
        if logits.shape[1] < n_classes:
            raise MptqError(f"the model outputs {logits.shape[1]} classes but {data_dir} has "
                            f"{n_classes} class folders")
        n_bad += int((~np.isfinite(logits)).any(axis=1).sum())
        # stable sort: ties rank the lower class index first, so top-1 == argmax
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        hits.append(top[:, 0] == y)
        correct5 += int((top == y[:, None]).any(axis=1).sum())
        images += n
        n_out = logits.shape[1]
    if images == 0:
        raise MptqError(f"no images evaluated from {data_dir}")
    if n_bad:
        raise MptqError(f"the model output NaN/Inf logits for {n_bad} of {images} images: it is broken, "
                        "so no accuracy is reported")
    hit = np.concatenate(hits)
    return EvalResult(
        top1=int(hit.sum()) / images,
        top5=correct5 / images if n_out >= 5 else None,
        images=images,
        images_per_s=images / infer_s if infer_s > 0 else float("inf"),
        seconds=time.perf_counter() - t_start,
        hits=hit,
    )
