"""Output folders: checked before any work, written beside the destination, renamed into place only when complete.

Rules (see README, "Exit codes and --force"):

- an output that is, contains or lies inside an input (model, base, reference, calibration file) is refused;
- an existing output is replaced only with ``--force``, and only when it is an earlier symmerge output (it holds
  :data:`MARKER`, or the ``alignment.json`` / ``merge.yaml`` older versions wrote) or an empty folder;
- the final rename never replaces an output that appeared while this run was working, unless ``--force``;
- an interrupted or failed run leaves neither the temporary folder nor a half-replaced output behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from symmerge.errors import SymmergeError

MARKER = ".symmerge-output"
OLD_MARKERS = ("alignment.json", "merge.yaml")  # what symmerge wrote before the marker existed

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute and normalised (``.`` → the current folder's path), symlinks not followed."""
    return Path(os.path.abspath(os.fspath(path)))


def is_symmerge_output(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and any((path / m).is_file() for m in (MARKER, *OLD_MARKERS))


def _is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _replaceable(out: Path) -> bool:
    return is_symmerge_output(out) or _is_empty_dir(out)


def _refuse_replacing(out: Path) -> SymmergeError:
    if out.is_symlink() or not out.is_dir():
        what = "a symbolic link" if out.is_symlink() else "a file"
        return SymmergeError(f"--out {out} is {what}, not a symmerge output: --force only replaces earlier symmerge outputs "
                             "or empty folders; remove it yourself, or choose another --out")
    return SymmergeError(f"--out {out} exists and is not a symmerge output (no {MARKER}): --force only replaces earlier "
                         "symmerge outputs or empty folders; remove it yourself if it should go, or choose another --out")


def check_output_dir(out: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse, before any work, an output that would destroy an input, replace something that is not ours, or
    cannot be written."""
    if not str(out).strip():  # Path("") is "." : the message would name a folder the user did not type
        raise SymmergeError("--out is empty: name the folder to create")
    given = Path(out)
    out = _absolute(out)
    if out.parent == out:
        raise SymmergeError(f"--out {given} is the root folder: choose a folder to create")
    real_out = Path(os.path.realpath(out))
    for inp in inputs:
        if inp is None:
            continue
        real_in = Path(os.path.realpath(inp))
        if real_out == real_in:
            relation = "is"
        elif real_out in real_in.parents:
            relation = "contains"
        elif real_in in real_out.parents:
            relation = "lies inside"
        else:
            continue
        raise SymmergeError(f"--out {given} {relation} the input {inp}: writing there could destroy or change it; "
                            "choose an --out outside every input")
    if out.exists() or out.is_symlink():
        if not force:
            raise SymmergeError(f"{given} already exists: choose another --out or pass --force to replace it")
        if not _replaceable(out):
            raise _refuse_replacing(out)
    parent = out.parent
    if not parent.is_dir():
        raise SymmergeError(f"the parent directory of {given} does not exist: create {parent} first")
    try:  # a real probe: permissions, read-only file systems, ACLs (and root, whom os.access always lets through)
        with _signals_deferred():
            os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as e:
        raise SymmergeError(f"cannot write --out {given}: {e.strerror or e} in {parent}; choose a writable location") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False when the system or file system lacks it; OSError else."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    fn = getattr(_libc, "renameat2", None) if _libc else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename folder ``src`` to ``dst``, raising FileExistsError if ``dst`` exists (even as an empty folder)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    # Fallback: claim ``dst`` with mkdir (atomic, fails if anything is there), then rename onto the empty folder we own.
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise


def _replace(src: Path, dst: Path) -> None:
    """Put folder ``src`` at ``dst`` in place of the existing ``dst``, then delete the old one."""
    if _renameat2(src, dst, _RENAME_EXCHANGE):  # atomic swap: ``src`` now holds the old output
        shutil.rmtree(src, ignore_errors=True)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    try:
        os.rename(dst, trash / "old")
        try:
            rename_noreplace(src, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                rename_noreplace(trash / "old", dst)  # put the old output back
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the output is swapped into place, so an interrupt cannot leave it half-done.

    The Python handlers are swapped for a recorder and a recorded signal is re-delivered afterwards. (Blocking
    the signal with pthread_sigmask is not enough: it blocks only this thread, and a signal sent to the process
    is then taken by another thread — torch's — whose arrival still runs the Python handler here at once.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:  # None: a handler installed outside Python, which we cannot restore
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signum = pending[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def _commit(tmp: Path, out: Path, given: Path, force: bool) -> None:
    for _ in range(5):  # --force against a concurrent run: retry if the output vanished between look and swap
        if not (out.exists() or out.is_symlink()):
            try:
                rename_noreplace(tmp, out)
                return
            except FileExistsError:
                if not force:
                    raise SymmergeError(f"{given} appeared while this run was working (another symmerge run?) and was "
                                        "left as it is; this run's output was discarded: rerun with another --out, or "
                                        "--force to replace it") from None
                continue
        if not force:
            raise SymmergeError(f"{given} appeared while this run was working (another symmerge run?) and was left as "
                                "it is; this run's output was discarded: rerun with another --out, or --force to replace it")
        if not _replaceable(out):
            raise _refuse_replacing(out)
        try:
            _replace(tmp, out)
            return
        except FileNotFoundError:
            continue
    raise SymmergeError(f"{given} kept changing while this run tried to write it (concurrent runs?): rerun")


def _write_error(e: OSError, given: Path) -> SymmergeError:
    where = f" ({e.filename})" if e.filename else ""
    return SymmergeError(f"cannot write --out {given}: {e.strerror or e}{where}; free space or choose another location")


_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_DENIED_ERRNOS = {errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; move it to ``out`` when the block succeeds, delete it if not."""
    given = Path(out)
    out = _absolute(out)
    check_output_dir(out, force, inputs)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise _write_error(e, given) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700: give the output the permissions of a normal mkdir
        (tmp / MARKER).write_text("written by symmerge; --force may replace this folder\n")
        try:
            yield tmp
        except OSError as e:
            in_tmp = e.filename is not None and str(e.filename).startswith(str(tmp))
            if e.errno in _FULL_ERRNOS or (e.errno in _DENIED_ERRNOS and in_tmp):
                raise _write_error(e, given) from None
            raise
        with _signals_deferred():
            _commit(tmp, out, given, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: str | os.PathLike, option: str, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse, before any work, an output file (``--plot``, ``--json``...) that is an input, would replace a file
    inside an input folder, is a folder, or has no folder to go in."""
    given, path = Path(path), _absolute(path)
    real = Path(os.path.realpath(path))
    for inp in inputs:
        if inp is None:
            continue
        real_in = Path(os.path.realpath(inp))
        if real == real_in or (real_in in real.parents and (path.exists() or path.is_symlink())):
            raise SymmergeError(f"{option} {given} {'is' if real == real_in else 'would replace a file of'} the input {inp}: "
                                f"choose a {option} outside every input")
    if path.is_dir():
        raise SymmergeError(f"{option} {given} is a folder: give a file name")
    if not path.parent.is_dir():
        raise SymmergeError(f"the parent directory of {option} {given} does not exist: create {path.parent} first")


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, option: str) -> Iterator[Path]:
    """Yield a temporary file name beside ``path`` (same suffix); move it onto ``path`` when the block succeeds,
    delete it if not: a reader never sees half a file."""
    given, path = Path(path), _absolute(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise SymmergeError(f"cannot write {option} {given}: {e.strerror or e}; choose a writable location") from None
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give it the permissions of a normal file
        with _signals_deferred():
            os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SymmergeError(f"cannot write {option} {given}: {e.strerror or e}; free space or choose another location") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
