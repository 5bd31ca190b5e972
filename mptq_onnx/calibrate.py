"""Calibration: run the float model in onnxruntime and collect statistics of the tensors to quantize.

Memory is bounded: per-tensor and per-channel extremes and means are running values over every
calibration token, and each tensor keeps only a bounded sample for the parameter searches: a
fixed number of rows (tokens) for Linear inputs, the whole tensor of the first few images for the
attention MatMul inputs (whose search needs the matrix structure).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from .modelio import LARGE_BYTES, fill_shell, image_input, take_weights, tensor_nbytes
from .errors import MptqError
from .runtime import first_line, make_session


@dataclasses.dataclass
class TensorStats:
    name: str
    min: float = np.inf
    max: float = -np.inf
    ch_min: np.ndarray | None = None  # over the last axis
    ch_max: np.ndarray | None = None
    ch_sum: np.ndarray | None = None
    rows: int = 0
    numel: int = 0                     # elements seen, over all calibration images
    sample: np.ndarray | None = None   # [n, C] token rows, or a whole leading slice of the tensor

    @property
    def ch_mean(self) -> np.ndarray:
        return self.ch_sum / max(self.rows, 1)

    def transformed(self, shift: np.ndarray, scale: np.ndarray) -> "TensorStats":
        """Stats of (x - shift) / scale per channel, for a folded rescaling (scale > 0)."""
        f = lambda a: None if a is None else (a - shift) / scale  # noqa: E731
        lo, hi = f(self.ch_min), f(self.ch_max)
        return TensorStats(self.name, float(lo.min()), float(hi.max()), lo, hi,
                           (self.ch_sum - shift * self.rows) / scale, self.rows, self.numel, f(self.sample))


@dataclasses.dataclass
class CalibData:
    images: np.ndarray                 # the calibration inputs
    stats: dict[str, TensorStats]
    logits: np.ndarray                 # float model outputs on `images`
    full_images: int = 0               # images the whole-tensor samples hold
    batch_size: int = 0                # images per onnxruntime run


def _libc():
    try:
        import ctypes
        lib = ctypes.CDLL("libc.so.6")
        return lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None
    except OSError:  # not glibc
        return None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
MMAP_THRESHOLD = 1 << 20
_TRIM_DEFAULT = 128 << 10  # glibc's M_TRIM_THRESHOLD
# whether map_large_allocations set the threshold in this process: mirrors the process-wide
# malloc setting it made, so heap_allocations can undo and redo it
_mapped = False


def release_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim). glibc keeps what numpy and
    onnxruntime free in its arenas, interleaved with what stays (the samples kept batch by
    batch), so the process would keep its largest size from pass to pass."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def map_large_allocations() -> None:
    """Allocations from 1 MiB up get their own mapping, returned to the OS when freed. glibc's
    default threshold rises (up to 32 MiB) with every such block freed, after which the searches'
    temporaries land in the heap and fragment it."""
    global _mapped
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _mapped = True


@contextlib.contextmanager
def heap_allocations():
    """Inside, large temporaries come from the heap again, where map_large_allocations had sent
    them to their own mappings: torch training allocates and frees the same few-MB tensors every
    step, and a fresh mapping for each made an elementwise op 3.6x slower (one add of 1.6M floats
    1.67 ms against 0.46 ms; a deit block's training step 2.1x slower, tools/recon_profile.py).
    The CLI's setting is restored after, and the heap trimmed. Nothing changes where
    map_large_allocations was not called (glibc's own threshold already adapts)."""
    if _LIBC is None or not _mapped:
        yield
        return
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest on 64-bit
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 32 << 20)
    try:
        yield
    finally:
        _LIBC.mallopt(_M_TRIM_THRESHOLD, _TRIM_DEFAULT)
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _LIBC.malloc_trim(0)


EXTERNAL_BYTES = LARGE_BYTES  # initializers at least this large reach onnxruntime as arrays, not serialized


def lean_copy(model: onnx.ModelProto, outputs: list[str] = (),
              weights: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """`model` (plus graph `outputs`) with its large initializers as external placeholders, and
    their values for `session(external=)`. Serializing whole models for each session (and
    onnxruntime parsing them) held up to three copies of vit_base's weights at once. `weights`:
    the values of initializers `model` holds without data (a `take_weights` shell)."""
    g = model.graph
    m = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                        producer_version=model.producer_version, domain=model.domain,
                        model_version=model.model_version)
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.name = g.name
    m.graph.node.extend(g.node)
    m.graph.input.extend(g.input)
    m.graph.output.extend(g.output)
    m.graph.value_info.extend(g.value_info)
    m.graph.sparse_initializer.extend(g.sparse_initializer)
    external = {}
    for t in g.initializer:
        if weights is not None and t.name in weights:
            external[t.name] = weights[t.name]
            m.graph.initializer.append(external_placeholder(t))
        elif t.data_type == onnx.TensorProto.FLOAT and t.data_location != onnx.TensorProto.EXTERNAL \
                and tensor_nbytes(t) >= EXTERNAL_BYTES:
            external[t.name] = onnx.numpy_helper.to_array(t)
            m.graph.initializer.append(external_placeholder(t))
        else:
            m.graph.initializer.append(t)
    have = {o.name for o in m.graph.output}
    for n in outputs:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
            have.add(n)
    return m, external


def with_session(owner, fn: Callable, outputs: list[str] = (), **kw):
    """`fn(session)` on `owner.model` (the conversion Context) without a third copy of its weights:
    the model is set aside as a shell and its weights as the arrays onnxruntime copies, then put
    back (the same bytes) as soon as the session exists. Built from the model as it is, the
    session held the proto, the arrays and onnxruntime's copy at once."""
    cfg = getattr(owner, "config", None)  # the conversion's onnxruntime providers and threads
    if cfg is not None:
        kw.setdefault("threads", cfg.threads)
        kw.setdefault("providers", cfg.providers)
    shell, weights = take_weights(owner.model)
    owner.model = None  # a proto's memory goes only with the whole message
    try:
        lean, external = lean_copy(shell, outputs, weights)
        sess = session(lean, external=external, **kw)
        del lean, external
    finally:
        owner.model = fill_shell(shell, weights)
    return fn(sess)


def session(model: onnx.ModelProto, threads: int | None = None,
            external: dict[str, ort.OrtValue | np.ndarray] | None = None, providers=None) -> ort.InferenceSession:
    """`external`: values of initializers the model holds as external-data placeholders
    (see `external_placeholder`), handed to onnxruntime without serializing them; without it,
    the model's large initializers are handed over so (`lean_copy`). onnxruntime copies them into
    its graph (AddExternalInitializers), so the caller may drop them once the session exists."""
    if external is None:
        model, external = lean_copy(model)
    sess = make_session(model, threads=threads, providers=providers, external=external)
    fixed = {i.name: i.shape[0] for i in sess.get_inputs()
             if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
    return FixedBatchSession(sess, fixed) if fixed else sess


class FixedBatchSession:
    """An InferenceSession for a graph whose inputs fix their batch (e.g. exported with batch 1).

    Feeds holding k times an input's fixed leading size are run in k slices and the outputs
    joined on axis 0, so callers can batch images freely whatever the export fixed.
    """

    def __init__(self, sess: ort.InferenceSession, fixed: dict[str, int]):
        self._sess, self._fixed = sess, fixed

    def __getattr__(self, name):
        return getattr(self._sess, name)

    def run(self, output_names, feeds: dict, run_options=None):
        k = {n: v.shape[0] // self._fixed[n] for n, v in feeds.items()
             if n in self._fixed and np.ndim(v) and v.shape[0] != self._fixed[n] and v.shape[0] % self._fixed[n] == 0}
        if not k or len(set(k.values())) != 1:
            return self._sess.run(output_names, feeds, run_options)
        parts = next(iter(k.values()))
        outs = []
        for j in range(parts):
            f = {n: (v[j * self._fixed[n]:(j + 1) * self._fixed[n]] if n in k else v) for n, v in feeds.items()}
            outs.append(self._sess.run(output_names, f, run_options))
        return [np.concatenate(o, axis=0) for o in zip(*outs)]


def external_placeholder(t: onnx.TensorProto) -> onnx.TensorProto:
    """An initializer with t's name, type and shape whose data is to come from `session(external=)`."""
    p = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims,
                         data_location=onnx.TensorProto.EXTERNAL)
    for k, v in (("location", "unused.bin"), ("offset", "0"), ("length", "0")):
        e = p.external_data.add()
        e.key, e.value = k, v
    return p


def calibrate(model: onnx.ModelProto, images: np.ndarray, row_tensors: list[str],
              full_tensors: list[str] = (), *, row_budget: int = 4096, full_images: int = 16,
              batch_size: int = 32, seed: int = 0, progress: bool = True,
              batch_bytes: int = 256 << 20, full_bytes: int = 256 << 20,
              weights: dict[str, np.ndarray] | None = None, threads: int | None = None,
              providers=None) -> CalibData:
    """Run `model` over `images`; sample rows of `row_tensors`, keep leading slices of `full_tensors`.

    Every tensor to quantize is a graph output, so one run holds all of them for its whole batch:
    the batch is cut to fit `batch_bytes`, and the whole-tensor samples keep at most `full_images`
    images and `full_bytes` (both measured on one image first; small models keep both limits).
    `weights`: as for `lean_copy`; emptied once the session has copied them.
    """
    full_tensors = [t for t in full_tensors if t not in row_tensors]
    names = list(dict.fromkeys(list(row_tensors) + list(full_tensors)))  # this order draws the row samples
    full_set = set(full_tensors)
    out_name = model.graph.output[0].name
    in_name = image_input(model).name
    lean, external = lean_copy(model, names, weights)
    # the arena keeps its largest size (a batch's outputs and intermediates) for the session's
    # life, but without it every tensor of every run is a fresh mapping faulted in page by page:
    # vit_base's 64 runs took 3.5-4 s longer (docs/scale.md, fifth round)
    sess = session(lean, external=external, threads=threads, providers=providers)
    del lean, external
    if weights is not None:
        weights.clear()  # onnxruntime has its copy
    try:
        probe = sess.run(names, {in_name: images[:1]})
    except Exception as e:  # the first image: a size the graph does not take fails here
        raise MptqError(f"onnxruntime cannot run the model on the calibration images (shape "
                        f"{list(images[:1].shape)}): {first_line(e)}; if the size is wrong, give it with --size "
                        "(or preprocessed tensors of the right size)") from None
    per_image = max(sum(v.nbytes for v in probe), 1)
    per_image_full = max(sum(v.nbytes for n, v in zip(names, probe) if n in full_set), 1)
    del probe
    batch_size = max(1, min(batch_size, batch_bytes // per_image))
    full_images = max(1, min(full_images, full_bytes // per_image_full))
    stats = {n: TensorStats(n) for n in names}
    samples: dict[str, list[np.ndarray]] = {n: [] for n in names}
    # row samples go straight into one array per tensor: thousands of small per-batch chunks
    # fragmented the heap (the peak grew with the number of batches)
    row_buf: dict[str, np.ndarray] = {}
    row_fill: dict[str, int] = {}
    rng = np.random.default_rng(seed)
    n_img = len(images)
    n_batches = (n_img + batch_size - 1) // batch_size
    logits = []
    seen_full = 0
    it = range(0, n_img, batch_size)
    for start in tqdm(it, desc="calibrate", unit="batch", disable=not progress, leave=False):
        xb = images[start:start + batch_size]
        outs = sess.run([out_name] + names, {in_name: xb})
        logits.append(outs[0])
        keep_full = seen_full < full_images
        for n, v in zip(names, outs[1:]):
            st = stats[n]
            st.numel += v.size
            if n in full_set:
                st.min = min(st.min, float(v.min()))
                st.max = max(st.max, float(v.max()))
                if keep_full:
                    # leading rows of this batch that belong to the first `full_images` images
                    per_img = max(v.shape[0] // len(xb), 1)
                    take = min(len(xb), full_images - seen_full) * per_img
                    samples[n].append(v[:take].copy())
                continue
            rows = v.reshape(-1, v.shape[-1])
            lo, hi = rows.min(0), rows.max(0)
            st.min = min(st.min, float(lo.min()))  # the tensor's range from the channels': one pass less
            st.max = max(st.max, float(hi.max()))
            if st.ch_min is None:
                st.ch_min, st.ch_max, st.ch_sum = lo, hi, rows.sum(0, dtype=np.float64)
            else:
                np.minimum(st.ch_min, lo, out=st.ch_min)
                np.maximum(st.ch_max, hi, out=st.ch_max)
                st.ch_sum += rows.sum(0, dtype=np.float64)
            st.rows += rows.shape[0]
            k = min(rows.shape[0], max(row_budget // n_batches, 1))
            idx = np.sort(rng.choice(rows.shape[0], size=k, replace=False))
            if n not in row_buf:
                row_buf[n] = np.empty((n_batches * max(row_budget // n_batches, 1), rows.shape[1]), rows.dtype)
                row_fill[n] = 0
            row_buf[n][row_fill[n]:row_fill[n] + k] = rows[idx]
            row_fill[n] += k
        if keep_full:
            seen_full += len(xb)
        del outs  # before the next run allocates its own
        release_memory()
    for n in names:
        chunks = samples.pop(n)  # freed as each tensor is joined: not every sample twice at the end
        if chunks:
            stats[n].sample = np.concatenate(chunks, axis=0)
        del chunks
        if n in row_buf:
            buf, filled = row_buf.pop(n), row_fill[n]
            stats[n].sample = buf if filled == len(buf) else buf[:filled].copy()
            del buf
        if stats[n].ch_sum is not None:
            stats[n].ch_sum = stats[n].ch_sum.astype(np.float32)
    return CalibData(images, stats, np.concatenate(logits, axis=0), min(full_images, n_img), batch_size)
