"""All-or-nothing file writes: every file torchsaq writes (checkpoints, exports, metrics) goes through here."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A failure at any point (an exception, Ctrl-C, a crash) leaves the previous file at ``path`` intact and
    removes the temporary file; an OSError (a full disk, no permission) is re-raised naming ``path``, and so is
    any other error of ``write`` on a file system left without space (torch.save, safetensors: no errno).
    Returns ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have given: the umask decides
        os.replace(tmp, path)
    except BaseException as e:
        full = not isinstance(e, (OSError, KeyboardInterrupt)) and _disk_full(path.parent)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if full:  # torch's zip writer and safetensors report a full disk without an errno
            raise OSError(errno.ENOSPC, f"cannot write {path}: {os.strerror(errno.ENOSPC)}; "
                                        f"any earlier {path.name} is unchanged") from e
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}; "
                                   f"any earlier {path.name} is unchanged") from e
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> Path:
    """:func:`atomic_write` for a text file."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def _disk_full(folder: Path) -> bool:
    """Whether the file system of ``folder`` has (next to) no space left: checked before the failed write's
    temporary file is removed."""
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
