"""Files the tool writes: where they may go, and how they get there without losing data.

Rules, each for a reason:
- A run never writes over a file it reads (the model, its external data, the
  feeds): every output is compared with every input by real path and by inode
  (`os.path.samefile`), so symlinks and hard links are caught too.
- An output is a regular file or does not exist yet; a device node, a FIFO or a
  socket is refused (replacing /dev/null with a file is not what anyone wants).
- Before the first pass, each output's folder is proven writable by creating and
  removing a probe file there, and the name is checked against the folder's
  name-length limit: a bad path costs no time and nothing is written.
- Writes go into a fresh temporary folder `.onnxopt-<pid>-<host>-XXXX` inside the
  target folder and are renamed into place. The pid in the name lets the next write
  into that folder remove what a killed process (SIGKILL, power loss) left behind;
  the host tag (a hash of the host name) keeps a writer on another machine or in
  another container sharing the folder, whose pid means nothing here, safe.
- While a run is in progress, `protected(paths)` makes every writer of the core
  refuse the files it reads, including writers deep inside a pass (a calibration
  cache) that never see the run's arguments.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path

from .errors import OutputError

TEMP_PREFIX = ".onnxopt-"
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-([0-9a-f]{8})-[A-Za-z0-9_]+$")
# Longest suffix the writer appends to an output's name (".<8 hex>.data").
NAME_MARGIN = 16

_protected: ContextVar[tuple[Path, ...]] = ContextVar("onnxopt_protected", default=())


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: same inode when both exist, else same real path."""
    try:
        a, b = Path(a), Path(b)
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):  # a NUL byte or an unreadable folder: not a file we read
        return False


def expand_reads(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files a run reads: each path, and every file below it when it is a folder."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file()]
        elif path.exists():
            files.append(path)
    return files


@contextlib.contextmanager
def protected(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """While inside, `check_not_read` refuses these files (and those below these folders)."""
    token = _protected.set((*_protected.get(), *expand_reads(paths)))
    try:
        yield
    finally:
        _protected.reset(token)


def check_not_read(
    path: str | os.PathLike, label: str = "output", reads: Iterable[Path] = ()
) -> None:
    """Refuse `path` when it is one of the files the run reads."""
    for source in (*reads, *_protected.get()):
        if same_file(path, source):
            raise OutputError(
                f"{label} {path} would overwrite {source}, a file this run reads: choose "
                "another path, inputs are never overwritten"
            )


def output_file(
    path: str | os.PathLike, *, label: str = "output", default_name: str | None = None
) -> Path:
    """Where an output goes: `path`, or `<path>/<default_name>` when `path` is a folder.

    A path that ends with a separator or names an existing folder means "into this
    folder"; without `default_name` that is refused.
    """
    text = os.fspath(path)
    target = Path(text)
    if text.endswith(("/", os.sep)) or target.is_dir():
        if not target.is_dir():
            raise OutputError(
                f"{label} folder {target} does not exist: create it or choose another path"
            )
        if default_name is None:
            raise OutputError(f"{label} {target} is a folder: give a file name")
        target = target / default_name
        if target.is_dir():
            raise OutputError(f"{label} {target} is a folder: give a file name")
    return target


def check_target(target: Path, *, label: str = "output", probe: bool = True) -> Path:
    """Refuse a target that cannot be written as a regular file, before any work is done."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise OutputError(
            f"{label} {target} cannot be used ({_reason(exc)}): choose another path"
        ) from None
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"{label} {target} is a folder: give a file name")
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(
            f"{label} {target} is not a regular file (a device, FIFO or socket): choose a file path"
        )
    folder = target.parent
    if not folder.is_dir():
        raise OutputError(
            f"{label} folder {folder} does not exist: create it or choose another path"
        )
    limit = _name_max(folder)
    if len(os.fsencode(target.name)) + NAME_MARGIN > limit:
        raise OutputError(
            f"{label} file name {target.name[:40]}... is too long for {folder} "
            f"(at most {limit - NAME_MARGIN} bytes here): choose a shorter name"
        )
    if probe:
        try:
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX + "probe-", dir=folder)
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise OutputError(
                f"cannot write {label} into {folder} ({_reason(exc)}): choose a writable folder"
            ) from None
    return target


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _reason(exc: OSError) -> str:
    if exc.errno is not None and exc.errno in errno.errorcode:
        return os.strerror(exc.errno)
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def write_error(target: Path, exc: OSError) -> OutputError:
    """The one-line error for a failed write (full disk, file-size limit, permissions)."""
    hint = {
        errno.ENOSPC: "free some space",
        errno.EFBIG: "raise the file-size limit (ulimit -f)",
        errno.EDQUOT: "free some of your quota",
    }.get(exc.errno or 0, "check the folder")
    return OutputError(
        f"could not write {target} ({_reason(exc)}): {hint} or choose another path; "
        "nothing was written"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(folder: Path) -> None:
    """Remove temporary folders of ours whose process is gone (killed while writing)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        if match.group(2) == HOST_TAG and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)


@contextlib.contextmanager
def temp_folder(folder: Path) -> Iterator[Path]:
    """A fresh `.onnxopt-<pid>-<host>-XXXX` folder inside `folder`, removed on the way out."""
    remove_stale(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-{HOST_TAG}-", dir=folder))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_outputs(
    outputs: dict[str, str | os.PathLike | None], reads: Iterable[str | os.PathLike] = ()
) -> dict[str, Path]:
    """Check report-like outputs (label -> path; None is skipped) before any work is done.

    Each must be creatable (see `check_target`), must not be a file the run reads,
    and no two outputs may be the same file.
    """
    read_files = expand_reads(reads)
    checked: dict[str, Path] = {}
    for label, path in outputs.items():
        if path is None:
            continue
        target = check_target(output_file(path, label=label), label=label)
        check_not_read(target, label, read_files)
        for other_label, other in checked.items():
            if same_file(target, other):
                raise OutputError(
                    f"{label} and {other_label} are the same file {target}: give each its own path"
                )
        checked[label] = target
    return checked
