"""Safe file output (issue 13 items 1, 2, 10): outputs are checked before the work, never clobber
an input, another output or (without --force) an existing file, and land whole or not at all."""
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from mptq_onnx import outputs
from mptq_onnx.cli import main
from mptq_onnx.embedded import embedded_calib_dir
from mptq_onnx.errors import MptqError

REPO_ROOT = Path(__file__).resolve().parents[1]
OLD = b"previous output, must survive"


def _convert(src, *extra):
    return ["convert", str(src), "--calib", str(embedded_calib_dir()), "--calib-size", "4", "--recipe", "uniform",
            "--act-method", "minmax", "--weight-method", "minmax", "-q", *map(str, extra)]


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*" + outputs.TEMP_MARK + "*"))


@pytest.fixture
def src(embedded_onnx, tmp_path) -> Path:
    p = tmp_path / "victim.onnx"
    p.write_bytes(embedded_onnx.read_bytes())
    return p


@pytest.fixture
def no_conversion(monkeypatch):
    """Refusals must come before the conversion: fail the test if it starts."""
    import mptq_onnx.convert

    def boom(*a, **k):
        raise AssertionError("the conversion started before the output paths were checked")
    monkeypatch.setattr(mptq_onnx.convert, "convert", boom)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mptq-onnx: error:") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# --------------------------------------------------------------------------- item 1: what may be written

@pytest.mark.parametrize("force", [False, True])
def test_report_never_overwrites_the_input(src, tmp_path, capsys, no_conversion, force):
    before = src.read_bytes()
    argv = _convert(src, "-o", tmp_path / "r.onnx", "--report", src) + (["--force"] if force else [])
    assert main(argv) == 2
    _one_error_line(capsys, "input model")
    assert src.read_bytes() == before and not (tmp_path / "r.onnx").exists()


def test_report_is_not_the_output(src, tmp_path, capsys, no_conversion):
    out = tmp_path / "r.onnx"
    out.write_bytes(OLD)
    assert main(_convert(src, "-o", out, "--report", tmp_path / "." / "r.onnx", "--force")) == 2
    _one_error_line(capsys, "also the output")
    assert out.read_bytes() == OLD
    # nor the model's external-data file
    assert main(_convert(src, "-o", tmp_path / "m.onnx", "--report", tmp_path / "m.onnx.data")) == 2
    _one_error_line(capsys, "external data")


def test_existing_report_needs_force(src, tmp_path, capsys, no_conversion):
    rep = tmp_path / "notes.json"
    rep.write_bytes(OLD)
    assert main(_convert(src, "-o", tmp_path / "new.onnx", "--report", rep)) == 2
    _one_error_line(capsys, "exists", "--force")
    assert rep.read_bytes() == OLD and not (tmp_path / "new.onnx").exists()


@pytest.mark.parametrize("link", ["hard", "sym"])
def test_output_linked_to_the_input_is_refused(src, tmp_path, capsys, no_conversion, link):
    before = src.read_bytes()
    alias = tmp_path / "alias.onnx"
    (os.link if link == "hard" else os.symlink)(src, alias)
    assert main(_convert(src, "-o", alias, "--force")) == 2
    _one_error_line(capsys, "input model")
    rep = tmp_path / "alias.report.json"
    assert main(_convert(src, "-o", tmp_path / "x.onnx", "--report", alias, "--force")) == 2
    _one_error_line(capsys, "input model")
    assert src.read_bytes() == before and not rep.exists()


# --------------------------------------------------------------------------- item 2: checked up front

def test_output_under_a_regular_file(src, tmp_path, capsys, no_conversion):
    f = tmp_path / "afile"
    f.write_bytes(OLD)
    assert main(_convert(src, "-o", f / "sub" / "m.onnx")) == 2
    _one_error_line(capsys, "is a file, not a folder")
    assert main(_convert(src, "-o", tmp_path / "m.onnx", "--report", f / "r.json")) == 2
    _one_error_line(capsys, "is a file, not a folder")
    assert f.read_bytes() == OLD and not (tmp_path / "m.onnx").exists()


def test_unwritable_folder(src, tmp_path, capsys, no_conversion, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root ignores the mode: make creating files there fail as it would for a user
        real = outputs._create_temp

        def create(target):
            if target.parent == ro:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
            return real(target)
        monkeypatch.setattr(outputs, "_create_temp", create)
    try:
        assert main(_convert(src, "-o", ro / "m.onnx")) == 2
        _one_error_line(capsys, "cannot write in", "ermission denied")
        assert main(_convert(src, "-o", tmp_path / "m.onnx", "--report", ro / "r.json")) == 2
        _one_error_line(capsys, "cannot write in")
    finally:
        ro.chmod(0o755)
    assert list(ro.iterdir()) == [] and list(tmp_path.glob("m.*")) == []


# --------------------------------------------------------------------------- item 10: missing folders

def test_missing_folders_are_created_and_said(src, tmp_path, capsys):
    out, rep = tmp_path / "models" / "q.onnx", tmp_path / "reports" / "deep" / "q.json"
    assert main(_convert(src, "-o", out, "--report", rep)) == 0
    err = capsys.readouterr().err
    assert f"created folder {out.parent}" in err and f"created folder {rep.parent}" in err
    assert onnx.load(str(out)).graph.node and rep.read_text().startswith("{")
    assert _temps(out.parent) == [] and _temps(rep.parent) == []


# --------------------------------------------------------------------------- item 2: atomic, all or nothing

def _half_then(exc):
    """An onnx.save_model that writes half the model to its file, then raises exc (a full disk...)."""
    def save(proto, f, *a, **k):
        data = proto.SerializeToString()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise exc
    return save


@pytest.mark.parametrize("previous", [False, True])
def test_full_disk_while_saving_the_model(src, tmp_path, capsys, monkeypatch, previous):
    out, rep = tmp_path / "q.onnx", tmp_path / "q.report.json"
    if previous:
        out.write_bytes(OLD)
        rep.write_bytes(OLD)
    monkeypatch.setattr(onnx, "save_model", _half_then(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert main(_convert(src, "-o", out, "--force")) == 2
    _one_error_line(capsys, "No space left on device", str(out))
    if previous:
        assert out.read_bytes() == OLD and rep.read_bytes() == OLD
    else:
        assert not out.exists() and not rep.exists()
    assert _temps(tmp_path) == []


def test_report_failure_keeps_the_previous_model(src, tmp_path, capsys, monkeypatch):
    """Model and report land together: a report that cannot be written fails the run before the model lands."""
    out, rep = tmp_path / "q.onnx", tmp_path / "q.report.json"
    out.write_bytes(OLD)
    real = outputs.Staging.write_bytes

    def full(self, target, data):
        real(self, target, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(outputs.Staging, "write_bytes", full)
    assert main(_convert(src, "-o", out, "--force")) == 2
    _one_error_line(capsys, "No space left on device", "nothing was written")
    assert out.read_bytes() == OLD and not rep.exists() and _temps(tmp_path) == []


def test_interrupt_while_saving_leaves_no_partial_file(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q.onnx"
    out.write_bytes(OLD)
    monkeypatch.setattr(onnx, "save_model", _half_then(KeyboardInterrupt()))
    assert main(_convert(src, "-o", out, "--force")) == 130
    assert out.read_bytes() == OLD and _temps(tmp_path) == []


def test_forced_overwrite_replaces_whole_file_and_keeps_its_mode(src, tmp_path):
    out = tmp_path / "q.onnx"
    out.write_bytes(OLD)
    out.chmod(0o640)
    assert main(_convert(src, "-o", out, "--force")) == 0
    assert onnx.load(str(out)).graph.node and (out.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.report.json", "victim.onnx"]


_SLOW_SAVE = """
import os, sys, time
import onnx

def save(proto, f, *a, **k):  # write half, tell the test, then stall: the test kills us here
    data = proto.SerializeToString()
    with open(f, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.fsync(fh.fileno())
        open(os.environ["MPTQ_TEST_MARKER"], "w").close()
        time.sleep(120)
        fh.write(data[len(data) // 2:])

onnx.save_model = save
from mptq_onnx.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("previous", [False, True])
def test_kill_9_during_save_leaves_nothing_or_the_previous_output(src, tmp_path, previous):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out, rep = out_dir / "q.onnx", out_dir / "q.report.json"
    if previous:
        out.write_bytes(OLD)
        rep.write_bytes(OLD)
    script, marker = tmp_path / "slow_save.py", tmp_path / "saving"
    script.write_text(_SLOW_SAVE)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), MPTQ_TEST_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, str(script), *_convert(src, "-o", out, "--force")[0:]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    if previous:
        assert out.read_bytes() == OLD and rep.read_bytes() == OLD
    else:
        assert not out.exists() and not rep.exists()
    # whatever the kill left behind is a hidden, recognisable temp file
    left = [p for p in out_dir.iterdir() if p not in (out, rep)]
    assert left and all(p.name.startswith(".q.onnx" + outputs.TEMP_MARK) for p in left), left


# --------------------------------------------------------------------------- demo and export use the same rules

def test_demo_out_dir_rules(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_bytes(OLD)
    assert main(["demo", "--out-dir", str(f), "-q"]) == 2
    _one_error_line(capsys, "is a file, not a folder")
    d = tmp_path / "demo"
    d.mkdir()
    (d / "deit_tiny_tin.uniform_w8a8.onnx").write_bytes(OLD)
    assert main(["demo", "--out-dir", str(d), "-q"]) == 2
    _one_error_line(capsys, "exists", "--force")
    assert (d / "deit_tiny_tin.uniform_w8a8.onnx").read_bytes() == OLD and f.read_bytes() == OLD


@pytest.fixture
def no_build(monkeypatch):
    import mptq_onnx.exporter

    def boom(*a, **k):
        raise AssertionError("the export started before the output path was checked")
    monkeypatch.setattr(mptq_onnx.exporter, "build_model", boom)


def test_export_checks_output_first(tmp_path, capsys, no_build):
    from mptq_onnx.exporter import export_model

    f = tmp_path / "afile"
    f.write_bytes(OLD)
    with pytest.raises(MptqError, match="is a file, not a folder"):
        export_model("deit_tiny_patch16_224", f / "x.onnx", log=None)
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(OLD)
    assert main(["export", "deit_tiny_patch16_224", "--checkpoint", str(ckpt), "-o", str(ckpt), "--force"]) == 2
    _one_error_line(capsys, "is the checkpoint")
    assert ckpt.read_bytes() == OLD and f.read_bytes() == OLD


# --------------------------------------------------------------------------- the mechanism itself

def test_external_data_lands_with_its_model(embedded_onnx, tmp_path, monkeypatch):
    import mptq_onnx.modelio as modelio

    m = onnx.load(str(embedded_onnx))
    monkeypatch.setattr(modelio, "_EXTERNAL_THRESHOLD", 0)  # small model, as if it were over 2 GiB
    out = tmp_path / "big.onnx"
    (tmp_path / "big.onnx.data").write_bytes(OLD)
    with pytest.raises(MptqError, match="exists"):
        modelio.save_model(m, out)
    assert (tmp_path / "big.onnx.data").read_bytes() == OLD
    modelio.save_model(onnx.load(str(embedded_onnx)), out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    back = onnx.load(str(out))
    assert {t.name: t.raw_data for t in back.graph.initializer} == {t.name: t.raw_data for t in m.graph.initializer}


def test_save_model_matches_onnx_bytes(embedded_onnx, tmp_path):
    from mptq_onnx.modelio import save_model

    m = onnx.load(str(embedded_onnx))
    save_model(m, tmp_path / "a.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == m.SerializeToString()
    with pytest.raises(MptqError, match="exists"):
        save_model(m, tmp_path / "a.onnx")
    # a symlinked output is written through, as opening it would, and stays a link
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "b.onnx").write_bytes(OLD)
    (tmp_path / "link.onnx").symlink_to(tmp_path / "real" / "b.onnx")
    save_model(m, tmp_path / "link.onnx", force=True)
    assert (tmp_path / "link.onnx").is_symlink() and (tmp_path / "real" / "b.onnx").read_bytes() == m.SerializeToString()
    assert _temps(tmp_path) == [] and _temps(tmp_path / "real") == []


def test_staging_error_discards_everything(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(OLD)
    with pytest.raises(ValueError):
        with outputs.Staging(force=True) as st:
            st.write_bytes(a, b"new a")
            st.write_bytes(b, b"new b")
            raise ValueError("writer bug")
    assert a.read_bytes() == OLD and not b.exists() and _temps(tmp_path) == []
    with outputs.Staging(force=True) as st:
        st.write_bytes(a, b"new a")
        st.write_bytes(b, b"new b")
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b" and _temps(tmp_path) == []
    assert outputs.atomic_write(a, lambda tmp: tmp.write_bytes(b"third")) == a and a.read_bytes() == b"third"
