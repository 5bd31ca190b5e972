"""mptq_onnx.data: image loading, ImageFolder listing, batching, calibration sources."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mptq_onnx.data import (IMAGE_EXTS, ImageFolder, iter_batches, load_calibration, load_image,
                            spread_indices)
from mptq_onnx.errors import MptqError
from mptq_onnx.modelio import Preprocess

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pp8(**kw) -> Preprocess:
    d = dict(input_size=(3, 8, 8), mean=MEAN, std=STD, interpolation="bicubic", crop_pct=1.0)
    d.update(kw)
    return Preprocess(**d)


def ref_normalize(rgb_u8: np.ndarray) -> np.ndarray:
    x = rgb_u8.astype(np.float64) / 255.0
    x = (x - np.array(MEAN)) / np.array(STD)
    return x.transpose(2, 0, 1)


def make_folder(root: Path, n_classes: int = 3, per_class: int = 4, size=(8, 8), seed: int = 0,
                ext: str = ".png") -> Path:
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / f"class_{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            px = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(px).save(d / f"img_{i:02d}{ext}")
    return root


# ---------------------------------------------------------------- load_image

def test_load_image_exact_size_no_resize(tmp_path):
    px = np.random.default_rng(1).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(px).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", pp8())
    assert x.dtype == np.float32 and x.shape == (3, 8, 8)
    np.testing.assert_allclose(x, ref_normalize(px), rtol=0, atol=1e-5)


def test_load_image_center_crop_without_resize(tmp_path):
    # 20x10 (WxH), target 8x8 at crop_pct 0.8: shorter side floor(8/0.8)=10 already -> only crop
    px = np.random.default_rng(2).integers(0, 256, size=(10, 20, 3), dtype=np.uint8)
    Image.fromarray(px).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", pp8(crop_pct=0.8))
    np.testing.assert_allclose(x, ref_normalize(px[1:9, 6:14]), rtol=0, atol=1e-5)


def test_load_image_resizes_shorter_side_then_crops(tmp_path):
    px = np.random.default_rng(3).integers(0, 256, size=(16, 32, 3), dtype=np.uint8)
    Image.fromarray(px).save(tmp_path / "big.png")
    for interp, mode in (("bilinear", Image.Resampling.BILINEAR), ("nearest", Image.Resampling.NEAREST)):
        x = load_image(tmp_path / "big.png", pp8(interpolation=interp))
        small = np.asarray(Image.fromarray(px).resize((16, 8), mode))  # shorter side 16 -> 8
        np.testing.assert_allclose(x, ref_normalize(small[:, 4:12]), rtol=0, atol=1e-5)


def test_load_image_grayscale_and_rgba_become_rgb(tmp_path):
    g = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png", pp8())
    np.testing.assert_allclose(x, ref_normalize(np.repeat(g[..., None], 3, axis=2)), atol=1e-5)
    Image.new("RGBA", (8, 8), (10, 20, 30, 40)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", pp8()).shape == (3, 8, 8)


def test_load_image_unknown_interpolation(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    with pytest.raises(MptqError, match="interpolation"):
        load_image(tmp_path / "a.png", pp8(interpolation="cubic-ish"))


# ---------------------------------------------------------------- ImageFolder

def test_image_folder_lists_sorted_classes_and_samples(tmp_path):
    root = make_folder(tmp_path / "ds", n_classes=3, per_class=2)
    (root / "class_01" / "notes.txt").write_text("not an image")
    (root / "class_02" / "nested").mkdir()
    Image.new("RGB", (8, 8)).save(root / "class_02" / "nested" / "deep.JPEG")  # upper-case ext
    (root / "README.md").write_text("a file at the top is not a class")
    ds = ImageFolder(root, pp8())
    assert ds.classes == ["class_00", "class_01", "class_02"]
    assert len(ds) == 7
    assert [y for _, y in ds.samples] == [0, 0, 1, 1, 2, 2, 2]
    assert all(Path(p).suffix.lower() in IMAGE_EXTS for p, _ in ds.samples)
    assert ds.samples[-1][0].endswith("deep.JPEG")
    x, y = ds[2]
    assert x.shape == (3, 8, 8) and y == 1


def test_image_folder_class_order_is_sorted_not_creation_order(tmp_path):
    for name in ("zebra", "ant", "Moth"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.png")
    ds = ImageFolder(tmp_path, pp8())
    assert ds.classes == ["Moth", "ant", "zebra"]
    assert ds.samples[0] == (str(tmp_path / "Moth" / "x.png"), 0)


@pytest.mark.parametrize("case", ["missing", "file", "no_classes", "no_images"])
def test_image_folder_errors(tmp_path, case):
    root = tmp_path / "ds"
    if case == "file":
        root.write_text("x")
    elif case == "no_classes":
        root.mkdir()
        Image.new("RGB", (8, 8)).save(root / "loose.png")
    elif case == "no_images":
        (root / "a").mkdir(parents=True)
        (root / "a" / "x.txt").write_text("x")
    with pytest.raises(MptqError) as ei:
        ImageFolder(root, pp8())
    msg = str(ei.value)
    assert str(root) in msg and "\n" not in msg
    assert {"missing": "not found", "file": "file", "no_classes": "no class",
            "no_images": "no images"}[case] in msg


# ---------------------------------------------------------------- spread_indices

def test_spread_indices_all_when_no_limit():
    assert spread_indices(5, None) == [0, 1, 2, 3, 4]
    assert spread_indices(5, 5) == [0, 1, 2, 3, 4]
    assert spread_indices(5, 99) == [0, 1, 2, 3, 4]


def test_spread_indices_even_and_deterministic():
    idx = spread_indices(100, 10)
    assert idx == spread_indices(100, 10)
    assert len(idx) == 10 and len(set(idx)) == 10 and idx == sorted(idx)
    assert all(0 <= i < 100 for i in idx)
    assert set(np.diff(idx)) == {10}
    idx = spread_indices(5050, 1000)
    assert len(set(idx)) == 1000 and max(idx) < 5050


def test_spread_indices_cover_every_class():
    # 7 classes x 13 images in class order; 7..30 picks must hit every class evenly
    labels = np.repeat(np.arange(7), 13)
    for limit in (7, 10, 21, 30):
        counts = np.bincount(labels[spread_indices(len(labels), limit)], minlength=7)
        assert counts.min() >= limit // 7 and counts.max() - counts.min() <= 1, (limit, counts)


def test_spread_indices_rejects_zero():
    with pytest.raises(MptqError):
        spread_indices(10, 0)


# ---------------------------------------------------------------- iter_batches

@pytest.mark.parametrize("workers", [0, 2])
def test_iter_batches_shapes_order_and_labels(tmp_path, workers):
    ds = ImageFolder(make_folder(tmp_path / "ds", n_classes=2, per_class=4), pp8())
    batches = list(iter_batches(ds, 3, workers=workers))
    assert [b[0].shape[0] for b in batches] == [3, 3, 2]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.dtype == np.float32 and x.shape == (8, 3, 8, 8)
    assert y.dtype == np.int64 and y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    for i, (p, _) in enumerate(ds.samples):
        np.testing.assert_array_equal(x[i], load_image(p, ds.pp))


def test_iter_batches_subset_in_given_order(tmp_path):
    ds = ImageFolder(make_folder(tmp_path / "ds", n_classes=2, per_class=4), pp8())
    (x, y), = list(iter_batches(ds, 10, indices=[7, 1, 4]))
    assert y.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(x[0], load_image(ds.samples[7][0], ds.pp))


def test_iter_batches_skips_corrupt_image_with_one_warning(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", n_classes=2, per_class=3)
    bad = root / "class_00" / "img_01.png"
    bad.write_bytes(b"this is not a png")
    trunc = root / "class_01" / "img_00.png"
    trunc.write_bytes(trunc.read_bytes()[:40])
    ds = ImageFolder(root, pp8())
    out = list(iter_batches(ds, 2, progress=None))
    y = np.concatenate([b[1] for b in out])
    assert y.tolist() == [0, 0, 1, 1]
    assert all(b[0].shape[0] == 2 for b in out)  # skipped images do not leave short batches
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 2
    assert lines[0].startswith(f"warning: skipping unreadable image {bad} (")
    assert lines[1].startswith(f"warning: skipping unreadable image {trunc} (")


def test_iter_batches_all_corrupt_raises(tmp_path, capsys):
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        (root / "a" / f"{i}.jpg").write_bytes(b"\xff\xd8garbage")
    ds = ImageFolder(root, pp8())
    with pytest.raises(MptqError, match="none of the 3 images"):
        list(iter_batches(ds, 2))


def test_iter_batches_progress_bar_goes_to_stderr(tmp_path, capsys):
    ds = ImageFolder(make_folder(tmp_path / "ds", n_classes=1, per_class=2), pp8())
    list(iter_batches(ds, 4, progress="eval"))
    cap = capsys.readouterr()
    assert cap.out == "" and "eval" in cap.err
    list(iter_batches(ds, 4, progress=None))
    assert capsys.readouterr().err == ""


def test_resized_images_are_noted_once(tmp_path, capsys):
    """A 4x4 and a 6x6 folder fed to an 8x8 model (crop 0.875): one note naming the sizes seen, the
    resize target and the crop; none when the images already have the model's size."""
    root = make_folder(tmp_path / "small", n_classes=2, per_class=3, size=(4, 4))
    make_folder(tmp_path / "small6", n_classes=1, per_class=2, size=(6, 6))
    (root / "class_09").mkdir()
    for f in (tmp_path / "small6" / "class_00").iterdir():
        f.rename(root / "class_09" / f.name)
    arr = load_calibration(root, pp8(crop_pct=0.875), n=8, progress=False)
    assert arr.shape == (8, 3, 8, 8)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == (f"note: images in {root} are 4x4, 6x6, the model takes 8x8: resized (shorter side 9, "
                        "bicubic) and center-cropped to 8x8")
    same = make_folder(tmp_path / "same", n_classes=2, per_class=3, size=(8, 8))
    list(iter_batches(ImageFolder(same, pp8(crop_pct=0.875)), 4, workers=2))
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- load_calibration

def test_load_calibration_from_folder_spreads_over_classes(tmp_path):
    root = make_folder(tmp_path / "ds", n_classes=4, per_class=5)
    ds = ImageFolder(root, pp8())
    arr = load_calibration(root, pp8(), n=4, progress=False)
    assert arr.dtype == np.float32 and arr.shape == (4, 3, 8, 8)
    idx = spread_indices(20, 4)
    assert sorted({ds.samples[i][1] for i in idx}) == [0, 1, 2, 3]
    for row, i in zip(arr, idx):
        np.testing.assert_array_equal(row, load_image(ds.samples[i][0], ds.pp))


def test_load_calibration_fewer_than_asked_warns(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", n_classes=2, per_class=2)
    arr = load_calibration(root, pp8(), n=128, progress=False)
    assert arr.shape == (4, 3, 8, 8)
    assert "only 4 calibration images" in capsys.readouterr().err


def test_load_calibration_npy_takes_first_n(tmp_path, capsys):
    data = np.random.default_rng(0).normal(size=(10, 3, 8, 8)).astype(np.float64)
    np.save(tmp_path / "c.npy", data)
    arr = load_calibration(tmp_path / "c.npy", pp8(), n=6)
    assert arr.dtype == np.float32 and arr.shape == (6, 3, 8, 8)
    np.testing.assert_allclose(arr, data[:6], rtol=1e-6)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("key", ["images", "x", "whatever"])
def test_load_calibration_npz_keys(tmp_path, key):
    good = np.full((3, 3, 8, 8), 1.5, np.float32)
    other = np.zeros((3, 3, 8, 8), np.float32)
    arrays = {key: good}
    if key == "images":
        arrays["x"] = other  # 'images' wins over 'x'
    np.savez(tmp_path / "c.npz", **arrays)
    arr = load_calibration(tmp_path / "c.npz", pp8(), n=2)
    assert arr.shape == (2, 3, 8, 8) and np.all(arr == 1.5)


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (4, 1, 8, 8)])
def test_load_calibration_wrong_shape(tmp_path, shape):
    np.save(tmp_path / "c.npy", np.zeros(shape, np.float32))
    with pytest.raises(MptqError) as ei:
        load_calibration(tmp_path / "c.npy", pp8())
    assert str(shape[1:]) in str(ei.value) and "(3, 8, 8)" in str(ei.value)


def test_load_calibration_wrong_shape_npz(tmp_path):
    np.savez(tmp_path / "c.npz", images=np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(MptqError, match=r"\(3, 32, 32\).*\(3, 8, 8\)"):
        load_calibration(tmp_path / "c.npz", pp8())


@pytest.mark.parametrize("case", ["3d", "empty", "corrupt", "missing", "txt", "nan", "empty_npz"])
def test_load_calibration_bad_sources(tmp_path, case):
    p = tmp_path / "c.npy"
    if case == "3d":
        np.save(p, np.zeros((3, 8, 8), np.float32))
    elif case == "empty":
        np.save(p, np.zeros((0, 3, 8, 8), np.float32))
    elif case == "corrupt":
        p.write_bytes(b"garbage, not numpy")
    elif case == "txt":
        p = tmp_path / "c.txt"
        p.write_text("1 2 3")
    elif case == "nan":
        a = np.zeros((2, 3, 8, 8), np.float32)
        a[1, 0, 0, 0] = np.nan
        np.save(p, a)
    elif case == "empty_npz":
        p = tmp_path / "c.npz"
        np.savez(p)
    with pytest.raises(MptqError) as ei:
        load_calibration(p, pp8())
    assert str(p) in str(ei.value)


def test_load_calibration_unreadable_folder(tmp_path):
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"nope")
    with pytest.raises(MptqError, match="could be read"):
        load_calibration(root, pp8(), progress=False)


# ---------------------------------------------------------------- real data

@pytest.mark.needs_shared
@pytest.mark.skipif(not (SHARED / "data" / "tin_calib").is_dir(), reason="../shared data not available")
def test_real_tin_calib_images():
    pp = Preprocess(input_size=(3, 64, 64), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    interpolation="bicubic", crop_pct=1.0)
    ds = ImageFolder(SHARED / "data" / "tin_calib", pp)
    assert len(ds.classes) == 202 and len(ds) == 1010
    idx = spread_indices(len(ds), 8)
    (x, y), = list(iter_batches(ds, 8, idx))
    assert x.shape == (8, 3, 64, 64) and x.dtype == np.float32
    assert y.dtype == np.int64 and len(set(y.tolist())) == 8
    lo = (0 - np.array(pp.mean)) / np.array(pp.std)
    hi = (1 - np.array(pp.mean)) / np.array(pp.std)
    per_c_min, per_c_max = x.min(axis=(0, 2, 3)), x.max(axis=(0, 2, 3))
    assert np.all(per_c_min >= lo - 1e-5) and np.all(per_c_max <= hi + 1e-5)
    assert np.all(per_c_max - per_c_min > 1.0)  # real photos span much of the range
    assert abs(float(x.mean())) < 1.5
