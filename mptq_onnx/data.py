"""Images on disk -> preprocessed float32 tensors (timm-style evaluation transform).

Layout: an ImageFolder directory (one sub-folder per class, class index = position of the
folder name in sorted order, as torchvision/timm number them).  Calibration may also come
from `.npy`/`.npz` files that already hold preprocessed NCHW tensors.
"""
from __future__ import annotations

import collections
import math
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import MptqError
from .runtime import first_line
from .modelio import Preprocess

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _warn(msg: str) -> None:
    # tqdm.write keeps an active progress bar intact
    tqdm.write(msg, file=sys.stderr)


def _resample(name: str) -> Image.Resampling:
    try:
        return _INTERPOLATION[name.lower()]
    except KeyError:
        raise MptqError(f"unknown interpolation {name!r}; expected one of {', '.join(_INTERPOLATION)}") from None


def load_image(path: str | os.PathLike, pp: Preprocess, sizes: set | None = None) -> np.ndarray:
    """Read one image and return float32 [3, H, W], as timm's eval transform would.

    RGB; resize the shorter side to floor(H / crop_pct) (skipped when the image already is
    HxW and crop_pct == 1); center-crop HxW; scale to [0, 1]; normalize by mean/std.
    `sizes`: a set to add the image's source (width, height) to.
    """
    _, h, w = pp.input_size
    with Image.open(path) as im:
        img = im.convert("RGB")  # also forces the decode, so errors surface here
    if sizes is not None:
        sizes.add(img.size)  # set.add is atomic: safe from the decode threads
    if not (img.size == (w, h) and pp.crop_pct == 1.0):
        iw, ih = img.size
        if h == w:
            short = math.floor(h / pp.crop_pct)
            # torchvision Resize(int): shorter side -> short, longer side truncated
            if iw <= ih:
                nw, nh = short, int(short * ih / iw)
            else:
                nw, nh = int(short * iw / ih), short
        else:
            sh, sw = math.floor(h / pp.crop_pct), math.floor(w / pp.crop_pct)
            ratio = max(sh / ih, sw / iw)  # keep the aspect ratio, cover the target
            nw, nh = max(round(iw * ratio), sw), max(round(ih * ratio), sh)
        if (nw, nh) != (iw, ih):
            img = img.resize((nw, nh), _resample(pp.interpolation))
        if nw < w or nh < h:  # crop_pct > 1: torchvision's CenterCrop pads with zeros
            canvas = Image.new("RGB", (max(nw, w), max(nh, h)))
            canvas.paste(img, ((max(nw, w) - nw) // 2, (max(nh, h) - nh) // 2))
            img, (nw, nh) = canvas, canvas.size
        top = int(round((nh - h) / 2.0))
        left = int(round((nw - w) / 2.0))
        img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.float32)  # H, W, 3
    mean = np.asarray(pp.mean, dtype=np.float32)
    std = np.asarray(pp.std, dtype=np.float32)
    arr = (arr / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _file_id(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _image_files(top: Path, seen_dirs: set, seen_files: set) -> list[str]:
    """Image files under `top`, sorted, following symlinks but visiting each real folder once
    and listing each real file once (a symlink loop or a linked copy would repeat them forever)."""
    listed: list[tuple[str, list[str]]] = []
    for dirpath, dirnames, fnames in os.walk(top, followlinks=True):
        if dirpath != str(top):
            key = _file_id(dirpath)
            if key in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add(key)
        dirnames.sort()
        listed.append((dirpath, sorted(f for f in fnames if f.lower().endswith(IMAGE_EXTS))))
    out: list[str] = []
    for dirpath, fnames in sorted(listed):
        for fname in fnames:
            path = os.path.join(dirpath, fname)
            try:
                fst = os.stat(path)
            except OSError:
                out.append(path)  # a dangling link: reading it reports the problem
                continue
            if (fst.st_dev, fst.st_ino) not in seen_files:
                seen_files.add((fst.st_dev, fst.st_ino))
                out.append(path)
    return out


class ImageFolder:
    """torchvision-compatible ImageFolder listing: `classes`, `class_to_idx`, `samples`."""

    def __init__(self, root: str | os.PathLike, pp: Preprocess):
        self.root = Path(root)
        self.pp = pp
        if not self.root.exists():
            raise MptqError(f"image folder not found: {self.root}")
        if not self.root.is_dir():
            raise MptqError(f"expected an image folder (one sub-folder per class), got a file: {self.root}")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise MptqError(f"{self.root} has no class sub-folders (expected ROOT/CLASS_NAME/IMAGE.jpg)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        samples: list[tuple[str, int]] = []
        # the root and every class folder are walked only as themselves, never through a link
        # from inside another class (whose images would get that class's label)
        seen_dirs = {_file_id(self.root)} | {_file_id(self.root / c) for c in self.classes}
        seen_files: set[tuple[int, int]] = set()
        for cls in self.classes:
            idx = self.class_to_idx[cls]
            for path in _image_files(self.root / cls, seen_dirs, seen_files):
                samples.append((path, idx))
        if not samples:
            raise MptqError(f"{self.root} has {len(self.classes)} class folders but no images "
                            f"({', '.join(IMAGE_EXTS)})")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, y = self.samples[i]
        return load_image(path, self.pp), y

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self.classes)} classes, {len(self)} images)"


def spread_indices(n_total: int, limit: int | None) -> list[int]:
    """`limit` indices spread evenly over range(n_total) (all of them if limit is None or >= n_total).

    The samples of an ImageFolder are ordered by class, so an evenly spread subset keeps
    every class (as long as limit >= number of classes) in proportion.
    """
    if limit is None or limit >= n_total:
        return list(range(n_total))
    if limit < 1:
        raise MptqError(f"the image limit must be at least 1, got {limit}")
    return [int((2 * i + 1) * n_total // (2 * limit)) for i in range(limit)]


def resize_note(sizes: set, pp: Preprocess, root) -> str | None:
    """One line saying that images of other sizes than the model's input were resized, or None."""
    _, h, w = pp.input_size
    other = sorted(s for s in sizes if s != (w, h))
    if not other:
        return None
    seen = ", ".join(f"{a}x{b}" for a, b in other[:4]) + (f" and {len(other) - 4} more" if len(other) > 4 else "")
    if h == w:
        target = f"shorter side {math.floor(h / pp.crop_pct)}"
    else:
        target = f"{math.floor(w / pp.crop_pct)}x{math.floor(h / pp.crop_pct)} (aspect kept)"
    return (f"note: images in {root} are {seen}, the model takes {w}x{h}: resized ({target}, "
            f"{pp.interpolation}) and center-cropped to {w}x{h}")


def _load_or_error(path: str, pp: Preprocess, sizes: set | None = None) -> np.ndarray | BaseException:
    try:
        return load_image(path, pp, sizes)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return e


def _default_workers() -> int:
    # decoding overlaps with inference; more threads than half the cores only fight
    # onnxruntime's own (spinning) threads for the CPU
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def _decoded(ds: ImageFolder, idx: list[int], workers: int, sizes: set | None = None,
             ) -> Iterator[tuple[int, np.ndarray | BaseException]]:
    """(index, array or the decode error) in order; with workers > 0, decoded ahead in threads."""
    if workers <= 0:
        for i in idx:
            yield i, _load_or_error(ds.samples[i][0], ds.pp, sizes)
        return
    ahead = 4 * workers + 64
    pending: collections.deque[tuple[int, Future]] = collections.deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mptq-decode")
    try:
        pos = 0
        while pos < len(idx) or pending:
            while pos < len(idx) and len(pending) < ahead:
                pending.append((idx[pos], pool.submit(_load_or_error, ds.samples[idx[pos]][0], ds.pp, sizes)))
                pos += 1
            i, fut = pending.popleft()
            yield i, fut.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def iter_batches(ds: ImageFolder, batch_size: int, indices: Sequence[int] | None = None,
                 progress: str | None = None, workers: int | None = None,
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (x float32 [B,3,H,W], y int64 [B]) over `indices` (default: all) in order.

    Images that cannot be decoded are skipped with one warning line each on stderr; if none
    can be decoded, MptqError. Images not of the model's size get one note line (`resize_note`).  Decoding runs in a small thread pool ahead of the consumer
    (`workers`, default min(4, cores / 2); 0 decodes inline).  `progress` labels a tqdm bar on
    stderr (None: no bar).
    """
    if batch_size < 1:
        raise MptqError(f"batch size must be at least 1, got {batch_size}")
    idx = list(range(len(ds))) if indices is None else [int(i) for i in indices]
    workers = _default_workers() if workers is None else int(workers)
    xs: list[np.ndarray] = []
    ys: list[int] = []
    n_ok = n_bad = 0
    first_err = ""
    sizes: set = set()
    with tqdm(total=len(idx), desc=progress, unit="img", file=sys.stderr, disable=progress is None,
              dynamic_ncols=True, leave=False) as bar:
        for i, res in _decoded(ds, idx, workers, sizes):
            bar.update(1)
            path, y = ds.samples[i]
            if isinstance(res, BaseException):
                n_bad += 1
                first_err = first_err or first_line(res)
                _warn(f"warning: skipping unreadable image {path} ({first_line(res)})")
                continue
            n_ok += 1
            xs.append(res)
            ys.append(y)
            if len(xs) == batch_size:
                yield np.stack(xs), np.asarray(ys, dtype=np.int64)
                xs, ys = [], []
    note = resize_note(sizes, ds.pp, ds.root)
    if note:
        _warn(note)
    if xs:
        yield np.stack(xs), np.asarray(ys, dtype=np.int64)
    if n_ok == 0 and n_bad:
        raise MptqError(f"none of the {n_bad} images in {ds.root} could be read (first error: {first_err})")


def _load_array(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.files)
                if not keys:
                    raise MptqError(f"{path} holds no arrays")
                key = "images" if "images" in keys else "x" if "x" in keys else keys[0]
                arr = z[key]
    except MptqError:
        raise
    except Exception as e:
        raise MptqError(f"cannot read calibration tensors from {path} ({first_line(e)})") from None
    return arr


def load_calibration(source: str | os.PathLike, pp: Preprocess, n: int = 128,
                     progress: bool = True) -> np.ndarray:
    """Calibration batch float32 [n', 3, H, W] from an ImageFolder dir or a .npy/.npz of tensors.

    A folder gives `spread_indices(len, n)` (all classes covered); an array file gives its
    first n samples.  Fewer than n available: use those, with a warning.
    """
    if n < 1:
        raise MptqError(f"the calibration size must be at least 1, got {n}")
    src = Path(source)
    if not src.exists():
        raise MptqError(f"calibration source not found: {src}")
    want = tuple(int(v) for v in pp.input_size)
    if src.is_dir():
        ds = ImageFolder(src, pp)
        chunks = [x for x, _ in iter_batches(ds, 64, spread_indices(len(ds), n),
                                             progress="calibration" if progress else None)]
        arr = np.concatenate(chunks)
    elif src.suffix.lower() in (".npy", ".npz"):
        arr = _load_array(src)
        if arr.ndim != 4:
            raise MptqError(f"calibration tensors in {src} have shape {tuple(arr.shape)}; "
                            f"expected (N, {', '.join(map(str, want))})")
        if tuple(arr.shape[1:]) != want:
            raise MptqError(f"calibration tensors in {src} are {tuple(arr.shape[1:])} per image "
                            f"but the model expects {want}")
        if arr.shape[0] == 0:
            raise MptqError(f"{src} holds no calibration samples (shape {tuple(arr.shape)})")
        if not np.issubdtype(arr.dtype, np.floating):
            hint = (" (8-bit pixels?): an array file must hold images already preprocessed as the model "
                    "expects (RGB scaled to [0, 1], normalized by the model's mean/std, NCHW); pass an "
                    "image folder instead to have mptq-onnx preprocess them"
                    if np.issubdtype(arr.dtype, np.integer) else "")
            raise MptqError(f"calibration tensors in {src} have dtype {arr.dtype}; expected float32{hint}")
        arr = np.ascontiguousarray(arr[:n], dtype=np.float32)
        if not np.isfinite(arr).all():
            raise MptqError(f"calibration tensors in {src} contain NaN or infinite values")
    else:
        raise MptqError(f"calibration source {src} must be an image folder, a .npy or a .npz file")
    if arr.shape[0] < n:
        _warn(f"warning: only {arr.shape[0]} calibration images available in {src} "
              f"(asked for {n}); using {arr.shape[0]}")
    return arr
