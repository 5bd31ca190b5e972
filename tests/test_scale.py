"""Memory of a conversion: calibration batches and samples bounded, images read from disk."""
import numpy as np

from mptq_onnx.calibrate import calibrate
from mptq_onnx.calibset import StreamedImages, open_calibration
from mptq_onnx.convert import convert
from mptq_onnx.embedded import embedded_calib_dir
from mptq_onnx.modelio import get_preprocess
from mptq_onnx.passes.calibrate import site_tensors
from mptq_onnx.passes.canonicalize import Canonicalize
from mptq_onnx.plan import Context, QuantConfig


def test_calibration_memory_is_bounded(model, calib):
    """Batches and whole-tensor samples fit their byte budgets; what calibration keeps, and its
    peak traced allocations, do not grow with the number of calibration images (past the budgets)."""
    import tracemalloc

    ctx = Context(model, QuantConfig(progress=False), calib)
    Canonicalize()(ctx)
    rows, full = site_tensors(ctx)
    kept, peaks = [], []
    for n in (8, 32):
        x = np.ascontiguousarray(calib[:n])
        tracemalloc.start()
        cd = calibrate(ctx.model, x, rows, full, row_budget=64, full_images=16, progress=False,
                       batch_bytes=4 << 20, full_bytes=2 << 20)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        per_image = sum(cd.stats[t].numel for t in cd.stats) * 4 // n
        assert cd.batch_size == max(1, (4 << 20) // per_image) < 32
        full_per_image = sum(cd.stats[t].numel for t in full if t not in rows) * 4 // n
        assert cd.full_images == max(1, (2 << 20) // full_per_image) < 8
        for t in rows:
            assert len(cd.stats[t].sample) <= 64
        for t in full:
            if t not in rows:
                s = cd.stats[t].sample
                per_image = cd.stats[t].numel // n // int(np.prod(s.shape[1:]))  # leading rows per image
                assert s.shape[0] == cd.full_images * per_image
                assert s.nbytes <= cd.full_images * cd.stats[t].numel * 4 // n
        kept.append(sum(st.sample.nbytes for st in cd.stats.values()))
    # only the head's one row per image is below the row budget with 8 images
    assert kept[0] <= kept[1] < 1.01 * kept[0], kept
    assert peaks[1] < 1.1 * peaks[0], peaks


def test_streamed_calibration_gives_the_same_images_and_model(model, calib, tmp_path):
    pp = get_preprocess(model)
    s = open_calibration(embedded_calib_dir(), pp, 32, progress=False)
    assert isinstance(s, StreamedImages) and len(s) == len(calib)
    assert np.array_equal(s[3:9], calib[3:9]) and s[40:].shape == (0, *calib.shape[1:])
    np.save(tmp_path / "c.npy", calib)
    m = open_calibration(tmp_path / "c.npy", pp, 16, progress=False)
    assert isinstance(m, np.memmap) and np.array_equal(m[:16], calib[:16])
    cfg = dict(wbits=8, abits=8, progress=False, batch_size=8)
    a = convert(model, calib[:16], QuantConfig(**cfg), verbose=False).model
    b = convert(model, m, QuantConfig(**cfg), verbose=False).model
    assert a.SerializeToString() == b.SerializeToString()


def test_weights_set_aside_and_put_back_give_the_same_model_and_outputs(model, calib):
    """The shell (no large weights' data) fills back to the same bytes, and a session run through
    with_session (the model set aside meanwhile) gives the outputs of a plain session."""
    import onnx

    from mptq_onnx.calibrate import session, with_session
    from mptq_onnx.modelio import fill_shell, model_shell, take_weights

    ref = model.SerializeToString()
    shell = model_shell(model)
    assert shell.ByteSize() < model.ByteSize() // 10
    assert fill_shell(shell, {t.name: t for t in model.graph.initializer}).SerializeToString() == ref
    shell, weights = take_weights(model)
    assert weights and all(w.dtype == np.float32 for w in weights.values())
    assert fill_shell(shell, weights).SerializeToString() == ref and not weights  # arrays dropped as copied

    class Owner:
        pass

    owner = Owner()
    owner.model = onnx.ModelProto.FromString(ref)
    feed = {model.graph.input[0].name: calib[:2]}
    y = with_session(owner, lambda s: s.run(None, feed)[0])
    assert owner.model.SerializeToString() == ref
    assert np.array_equal(y, session(model).run(None, feed)[0])


def test_shape_inference_never_gets_the_weights(model, calib, monkeypatch):
    """Every shape inference of a conversion (graph analysis after each pass that invalidates it,
    the simulator's types) runs on the weightless shell: on vit_base a copy with the weights
    was a 1.3 GB peak."""
    import onnx

    from mptq_onnx.modelio import is_large_raw
    real = onnx.shape_inference.infer_shapes
    seen = []

    def spy(m, *a, **k):
        seen.append(sum(len(t.raw_data) for t in m.graph.initializer if is_large_raw(t)))
        return real(m, *a, **k)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    cfg = QuantConfig(recipe="mptq", wbits=4, abits=4, calib_size=16, progress=False)
    convert(model, calib[:16], cfg, verbose=False)
    assert len(seen) >= 2 and max(seen) == 0
