"""
The output folder of a conversion: checked before any expensive work, and claimed in one step by the finished staging
folder (Linux `renameat2` exchange and no-replace renames, with a portable fallback), never half-written and never
replacing what another process put there meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .checkpoint_files import ConversionError

__all__ = ["check_output", "claim"]

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_OCCUPIED = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux `renameat2(2)`; False where the system or the file system lacks it (the caller falls back)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc before 2.28, or another C library
        return False
    at_cwd = -100
    if function(at_cwd, os.fsencode(source), at_cwd, os.fsencode(target), ctypes.c_uint(flags)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename `source` to `target`, failing with an `OSError` (EEXIST, ENOTEMPTY, ...) if anything is there."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if os.path.lexists(target):  # fallback: only an empty folder appearing in between could still be replaced
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def _swap_in(staging: Path, output: Path) -> None:
    """Replace the folder `output` by `staging` atomically (exchange, or a rename sequence that restores it)."""
    if _renameat2(staging, output, _RENAME_EXCHANGE):
        shutil.rmtree(staging)  # now the previous folder
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    old = holder / output.name
    os.rename(output, old)
    try:
        _rename_noreplace(staging, output)
    except OSError as error:
        try:
            _rename_noreplace(old, output)
        except OSError:
            raise ConversionError(
                f"Could not move the converted folder to {output} ({error.strerror}), nor the previous folder back: "
                f"the previous folder is safe at {old}, the converted one at {staging}."
            ) from None
        holder.rmdir()
        raise
    shutil.rmtree(holder)


def claim(staging: Path, output: Path, overwrite: bool) -> None:
    """Move the finished `staging` folder to `output` in one step; with something at `output` that appeared while
    converting (and no --overwrite), refuse, keeping both."""
    if output.is_dir() and not output.is_symlink():
        if overwrite:
            return _swap_in(staging, output)
        with contextlib.suppress(OSError):
            output.rmdir()  # an empty folder, as checked at the start; fails if anything was put into it since
    try:
        return _rename_noreplace(staging, output)
    except OSError as error:
        if error.errno not in _OCCUPIED:
            raise
    kept = output.with_name(f"{output.name}.converted-{staging.name.rsplit('-', 1)[-1]}")
    try:
        _rename_noreplace(staging, kept)
    except OSError:
        kept = staging
    raise ConversionError(
        f"{output} appeared while converting (another process?) and --overwrite was not given: it was left as it "
        f"is, and the converted folder was kept at {kept}. Move it into place yourself, or convert again with "
        f"--overwrite."
    )


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that cannot be written, before any expensive work: a file, a symbolic link, a folder that is
    not empty (without --overwrite) or cannot be read, a parent that is a file, no permission, a read-only disk."""
    if not output.name or output.name == "..":
        raise ConversionError(f"The output {output} does not name a folder; pass a path such as hub/dasheng-base.")
    if output.is_symlink():
        raise ConversionError(f"The output {output} is a symbolic link; pass the path of the folder itself.")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"The output {output} is a file; pass a folder path.")
    if output.is_dir():
        try:
            occupied = any(output.iterdir())
        except OSError as error:
            raise ConversionError(f"Cannot read the output folder {output}: {error.strerror}.") from None
        if occupied and not overwrite:
            raise ConversionError(f"The output folder {output} is not empty; pass --overwrite to replace it.")
    parent = output.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"Cannot create {output}: {parent} is a file, not a folder. Choose another output path.")
    if hasattr(os, "statvfs") and os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise ConversionError(f"Cannot write {output}: {parent} is on a read-only file system.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(
            f"Cannot write {output}: permission denied in {parent}. Choose a folder you can write to."
        )
