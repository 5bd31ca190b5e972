"""Safe file output: every path a command writes is checked before the work starts, then written
to a temporary file beside it and renamed onto it in one step, so a kill, a full disk or an error
leaves either the previous file or nothing at the destination, never a partial file.

    plan = plan_outputs({"input model": src}, {"output": out, "report": rep}, force)  # before the work
    with plan.staging() as st:          # after it
        save_model(model, out, staging=st)
        st.write_bytes(rep, data)
    # leaving the block renames the files in the order they were staged (model first, report last)
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Callable, Mapping

from .errors import MptqError

TEMP_MARK = ".tmp-"  # temporaries are ".NAME.tmp-XXXXXXXX": hidden, and obviously not an output


def temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{TEMP_MARK}{secrets.token_hex(4)}")


def final_path(target: str | os.PathLike) -> Path:
    """Where a write to target lands: through a symlinked output (as opening it would), not onto the link."""
    target = Path(target)
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _same_file(a: Path, b: Path) -> bool:
    """a and b name one file: same resolved path, or (both existing) same inode, e.g. a hard link."""
    if os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b)):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # Windows cannot open folders; os.replace is already durable enough there
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _create_temp(target: Path) -> Path:
    """An empty new temp file beside target (O_EXCL: never reuses a name), mode from the umask."""
    tmp = temp_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    return tmp


def _probe_folder(folder: Path) -> None:
    """Create, write one byte to, and remove a temp file: the checks a save would fail later."""
    tmp = _create_temp(folder / "probe")
    try:
        with open(tmp, "wb") as f:
            f.write(b"\0")
            f.flush()
    finally:
        tmp.unlink()


def _check_folder(label: str, path: Path, log: Callable[[str], None] | None) -> Path | None:
    """Make sure path's folder exists (creating it, and saying so) and is writable; return it if created."""
    parent = path.parent
    anc = parent
    while not anc.exists():  # nearest existing ancestor; exists() follows symlinks
        if anc.is_symlink():
            raise MptqError(f"{label} {path}: {anc} is a broken symbolic link")
        anc = anc.parent
    if not anc.is_dir():
        raise MptqError(f"{label} {path}: {anc} is a file, not a folder")
    created = None
    if anc != parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MptqError(f"{label} {path}: cannot create folder {parent} ({_reason(e)})") from None
        created = parent
        if log:
            log(f"created folder {parent}")
    try:
        _probe_folder(parent)
    except OSError as e:
        raise MptqError(f"{label} {path}: cannot write in {parent} ({_reason(e)})") from None
    return created


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    """The checked destinations of one run, in the order they are committed."""

    targets: tuple[Path, ...]
    force: bool
    created: tuple[Path, ...] = ()  # folders made for the targets

    def staging(self) -> "Staging":
        return Staging(self.force)


def to_stderr(msg: str) -> None:
    print(f"mptq-onnx: {msg}", file=sys.stderr)


def plan_outputs(inputs: Mapping[str, object], outputs: Mapping[str, object], force: bool,
                 log: Callable[[str], None] | None = to_stderr,
                 may_write: Mapping[str, object] | None = None) -> OutputPlan:
    """Check every output before any work: none is an input (also through links) or another output,
    none is a folder, none exists unless `force`, and each one's folder exists (missing ones are
    created, with a line to `log`) and is writable. Labels (`-o`, `--report`, ...) name the paths
    in messages; None paths are skipped. `may_write` paths (a model's external data, written only
    above 2 GiB) get the same checks except that an existing one is only refused when written."""
    ins = {k: Path(v) for k, v in inputs.items() if v is not None}
    outs = {k: Path(v) for k, v in outputs.items() if v is not None}
    maybe = {k: Path(v) for k, v in (may_write or {}).items() if v is not None}
    seen: dict[str, Path] = {}
    for label, p in {**outs, **maybe}.items():
        if p.is_dir():
            raise MptqError(f"{label} {p} is a folder: give the path of the file to write")
        for in_label, q in ins.items():
            if _same_file(p, q):
                raise MptqError(f"{label} {p} is the {in_label}; choose another path")
        for other_label, q in seen.items():
            if _same_file(p, q):
                raise MptqError(f"{label} {p} is also the {other_label} path; give them different paths")
        if not force and label in outs and (p.exists() or p.is_symlink()):
            raise MptqError(f"{p} exists; pass --force to overwrite it")
        seen[label] = p
    created = []
    for label, p in outs.items():
        if (c := _check_folder(label, final_path(p), log)) is not None:
            created.append(c)
    return OutputPlan(tuple(outs.values()), force, tuple(created))


class Staging:
    """Temp files beside their targets, renamed onto them when the `with` block ends without error.

    Files are committed in the order they were staged; each is fsynced before its rename and each
    folder after. On any exception (KeyboardInterrupt too) the temps are removed and the targets
    are left as they were; an OSError becomes one MptqError line.
    """

    def __init__(self, force: bool = False):
        self.force = force
        self._moves: list[tuple[Path, Path]] = []  # (temp, target)
        self._temps: list[Path] = []  # files and folders to remove if not committed
        self.committed: list[Path] = []

    def temp_for(self, target: str | os.PathLike) -> Path:
        """A new empty temp file to write; it replaces `target` on commit."""
        target = final_path(target)
        try:
            tmp = _create_temp(target)
        except OSError as e:
            raise MptqError(f"cannot write {target}: {_reason(e)}") from None
        self._temps.append(tmp)
        self._moves.append((tmp, target))
        return tmp

    def temp_folder(self, target: str | os.PathLike) -> Path:
        """A new temp folder beside `target` for writers that produce several files (ONNX external
        data); `add` the files written in it."""
        target = Path(target)
        tmp = temp_name(target)
        tmp.mkdir()
        self._temps.append(tmp)
        return tmp

    def add(self, tmp: str | os.PathLike, target: str | os.PathLike) -> None:
        self._moves.append((Path(tmp), final_path(target)))

    def write_bytes(self, target: str | os.PathLike, data: bytes) -> None:
        tmp = self.temp_for(target)
        with open(tmp, "wb") as f:
            f.write(data)

    def commit(self) -> None:
        for tmp, target in self._moves:
            _fsync_path(tmp)
        for tmp, target in self._moves:
            if not self.force and target.exists():  # appeared since the plan was checked
                raise MptqError(f"{target} exists; pass --force to overwrite it")
        for tmp, target in self._moves:
            try:
                os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))  # keep an overwritten file's permissions
            except OSError:
                pass  # no previous file (or not ours to read): the umask's mode
            os.replace(tmp, target)
            self.committed.append(target)
        for d in dict.fromkeys(t.parent for _, t in self._moves):
            _fsync_path(d, directory=True)

    def discard(self) -> None:
        for tmp in reversed(self._temps):
            try:
                if tmp.is_dir() and not tmp.is_symlink():
                    for f in tmp.iterdir():
                        f.unlink()
                    tmp.rmdir()
                else:
                    tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                pass  # best effort: the name says what it is
        self._temps.clear()

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.commit()
        except OSError as e:
            self.discard()
            raise MptqError(self._message(e)) from None
        except BaseException:
            self.discard()
            raise
        else:
            if exc_type is not None:
                self.discard()
                if issubclass(exc_type, OSError):
                    raise MptqError(self._message(exc)) from None
            return False
        finally:
            for d in [t for t in self._temps if t.is_dir()]:  # emptied external-data staging folders
                try:
                    d.rmdir()
                except OSError:
                    pass

    def _message(self, e: OSError) -> str:
        pending = [t for _, t in self._moves if t not in self.committed]
        what = ", ".join(str(t) for t in pending) or "the output"
        msg = f"cannot write {what}: {_reason(e)}"
        if self.committed:
            return msg + f" (written: {', '.join(str(t) for t in self.committed)})"
        return msg + "; nothing was written (any previous file is unchanged)"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], force: bool = True) -> Path:
    """write(tmp) fills a temp file beside `path`, which then replaces `path` in one step."""
    with Staging(force) as st:
        write(st.temp_for(path))
    return Path(path)
