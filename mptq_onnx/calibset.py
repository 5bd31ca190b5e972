"""Calibration images read from disk when a batch is asked for, instead of held as one array.

At 224x224 each image is 0.6 MB of float32: 128 images are 77 MB, 1024 are 616 MB, and the
conversion's memory would grow with --calib-size. `open_calibration` gives an object that the
passes slice like the array (`len`, `x[a:b]`); each slice decodes its images again (the same
function and the same values as `load_calibration`), or reads them from a memory-mapped .npy.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import ImageFolder, _decoded, _warn, load_calibration, load_image, spread_indices
from .runtime import first_line
from .errors import MptqError
from .modelio import Preprocess


class StreamedImages:
    """[N, 3, H, W] float32 images of an ImageFolder, decoded slice by slice."""

    def __init__(self, ds: ImageFolder, indices: list[int]):
        self.ds, self.indices = ds, list(indices)
        self.shape = (len(self.indices), *(int(v) for v in ds.pp.input_size))
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("StreamedImages takes slices only")
        sel = self.indices[key]
        if not sel:
            return np.empty((0, *self.shape[1:]), np.float32)
        return np.stack([load_image(self.ds.samples[i][0], self.ds.pp) for i in sel])


def open_calibration(source: str | os.PathLike, pp: Preprocess, n: int = 128, progress: bool = True,
                     fewer_ok: bool = False):
    """`load_calibration`'s images, not loaded: a StreamedImages for a folder (each image is decoded
    once here to drop unreadable ones, with the same warnings), a read-only memory map for a float32
    .npy; other sources are loaded as `load_calibration` does. `fewer_ok`: no warning when the
    source holds fewer than `n` (a default asked for, not the user)."""
    src = Path(source)
    if n < 1 or not src.exists() or not (src.is_dir() or src.suffix.lower() == ".npy"):
        return load_calibration(source, pp, n, progress)
    if src.is_dir():
        ds = ImageFolder(src, pp)
        ok, n_bad, first_err = [], 0, ""
        for i, res in _decoded(ds, spread_indices(len(ds), n), workers=max(1, min(4, (os.cpu_count() or 1) // 2))):
            if isinstance(res, BaseException):
                n_bad += 1
                first_err = first_err or first_line(res)
                _warn(f"warning: skipping unreadable image {ds.samples[i][0]} ({first_line(res)})")
            else:
                ok.append(i)
        if not ok:
            raise MptqError(f"none of the {n_bad} images in {ds.root} could be read (first error: {first_err})")
        if len(ok) < n and not fewer_ok:
            _warn(f"warning: only {len(ok)} calibration images available in {src} (asked for {n}); using {len(ok)}")
        return StreamedImages(ds, ok)
    try:
        arr = np.load(src, mmap_mode="r", allow_pickle=False)
    except Exception:
        return load_calibration(source, pp, n, progress)  # it reports the error
    want = tuple(int(v) for v in pp.input_size)
    if arr.dtype != np.float32 or arr.ndim != 4 or tuple(arr.shape[1:]) != want or arr.shape[0] == 0 \
            or not arr.flags.c_contiguous:
        del arr
        return load_calibration(source, pp, n, progress)  # converts, or reports what is wrong
    arr = arr[:n]
    for i in range(0, len(arr), 64):
        if not np.isfinite(arr[i:i + 64]).all():
            raise MptqError(f"calibration tensors in {src} contain NaN or infinite values")
    if arr.shape[0] < n and not fewer_ok:
        _warn(f"warning: only {arr.shape[0]} calibration images available in {src} "
              f"(asked for {n}); using {arr.shape[0]}")
    return arr
