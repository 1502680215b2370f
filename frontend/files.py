"""Files the clients can name: real-path containment, atomic writes, streamed (Range) responses.

Containment is decided on real paths (`os.path.realpath`: symlinks and `..` resolved) compared as paths,
never as string prefixes, so `outputs_evil/` next to `outputs/` and a symlink that leads out are refused.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import stat
import tempfile
from pathlib import Path, PurePosixPath

from starlette.responses import FileResponse


class PathOutsideRoot(Exception):
    """The name leads outside the folder (answered 403, without saying where it led)."""


class FileMissing(Exception):
    """Inside the folder, but no regular file there (answered 404)."""


def contained_path(root: Path, relative: str, allow_root: bool = False) -> Path:
    """The real path that `relative` names inside `root`; raises PathOutsideRoot when it leads out.

    The file need not exist. `root` itself is refused unless `allow_root` (it is a folder, not a file)."""
    if "\x00" in relative or PurePosixPath(relative).is_absolute() or relative.startswith("\\"):
        raise PathOutsideRoot(relative)
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root / relative))
    if (real == real_root and not allow_root) or not real.is_relative_to(real_root):
        raise PathOutsideRoot(relative)
    return real


def unwritable_reason(root: Path, relative: str) -> str | None:
    """Why `atomic_write(root, relative, ...)` would fail as things stand (it names a folder, or one of its
    folders is a file), or None; raises PathOutsideRoot when it leads out. Blocking: run it in a thread."""
    target = contained_path(root, relative)
    if target.is_dir():
        return "names an existing folder, not a file"
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    return None if parent.is_dir() else "one of its folders is an existing file"


def existing_file(root: Path, relative: str) -> tuple[Path, os.stat_result]:
    """The real path and stat of a regular file inside `root` (blocking: run it in a thread)."""
    path = contained_path(root, relative)
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError, PermissionError, OSError):
        raise FileMissing(relative) from None
    if not stat.S_ISREG(info.st_mode):
        raise FileMissing(relative)
    return path, info


def atomic_write(root: Path, relative: str, data: bytes) -> Path:
    """Write `data` to `root/relative` so that readers see the old file or the whole new one, never a part.

    Parent folders are created inside `root` only; a symlinked folder that leads out is refused, and an
    existing symlink at the target is replaced, not followed. Blocking: run it in a thread."""
    name = PurePosixPath(relative)
    if name.name in ("", ".", "..") or ".." in name.parts:
        raise PathOutsideRoot(relative)
    root.mkdir(parents=True, exist_ok=True)
    folder = contained_path(root, str(name.parent), allow_root=True)
    folder.mkdir(parents=True, exist_ok=True)
    # The folders now exist: check again, in case one of them became a link while we created it.
    if contained_path(root, str(name.parent), allow_root=True) != folder:
        raise PathOutsideRoot(relative)
    target = folder / name.name
    temporary = durable_temporary_file(folder, target.name, data)
    try:
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def durable_temporary_file(folder: Path, name: str, data: bytes) -> Path:
    """`data` written and synced to a hidden temporary file in `folder`, ready to be renamed into place."""
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


class Folder:
    """A folder that client-supplied names are confined to (outputs/, inputs/)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    async def write(self, relative: str, data: bytes) -> Path:
        return await asyncio.to_thread(atomic_write, self.root, relative, data)

    async def find(self, relative: str) -> tuple[Path, os.stat_result]:
        """Raises PathOutsideRoot or FileMissing."""
        return await asyncio.to_thread(existing_file, self.root, relative)

    async def response(self, relative: str, filename: str | None = None) -> FileResponse:
        """A streamed download with Range (206), HEAD and Content-Disposition (Starlette's FileResponse)."""
        path, info = await self.find(relative)
        name = filename or path.name
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if name.lower().endswith(".mp4"):
            media_type = "video/mp4"
        return FileResponse(path, media_type=media_type, filename=name, stat_result=info)
