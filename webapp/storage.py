"""Content-addressed file store: images, heatmaps and model checkpoints by sha256.

Files live under STORAGE_DIR, outside `static/`, so that only the authenticated file
route can serve them. The same bytes are stored once, whoever uploads them; a key is
``<kind>/<first two hex digits>/<sha256><suffix>``.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_KEY = re.compile(r"^[a-z]+/[0-9a-f]{2}/[0-9a-f]{64}\.[a-z0-9]{1,5}$")


def make_private(path: Path, directory: bool = False) -> None:
    """Create ``path`` (a folder, or an empty file) readable by its owner only, or take
    group and other permissions away from an existing one that we own."""
    if directory:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    elif not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:  # another process created it first
            pass
    try:
        if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
            path.chmod(0o700 if directory else 0o600)
    except OSError:  # a file system without modes, or not ours to change: leave it
        pass


class FileStore:
    """A folder of immutable files named by their sha256, readable by the owner only
    (patient images)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def put(self, data: bytes, kind: str, suffix: str) -> tuple[str, str]:
        """Store ``data`` (idempotent) and return ``(key, sha256 hex digest)``."""
        key, digest, _created = self.put_new(data, kind, suffix)
        return key, digest

    def put_new(self, data: bytes, kind: str, suffix: str) -> tuple[str, str, bool]:
        """As :meth:`put`, and whether this call wrote the file (False: it was there)."""
        digest = hashlib.sha256(data).hexdigest()
        key = f"{kind}/{digest[:2]}/{digest}{suffix.lower()}"
        path = self.path(key)
        if not path.exists():
            if not path.parent.is_dir():
                make_private(self.root, directory=True)
                for folder in (path.parent.parent, path.parent):
                    folder.mkdir(mode=0o700, exist_ok=True)
            # mkstemp creates the file with mode 0600.
            # Write then rename: a reader never sees half a file, and two writers of the
            # same content simply replace one identical file with another.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return key, digest, True
        return key, digest, False

    def path(self, key: str) -> Path:
        """The local path of ``key``; raises ValueError for anything not shaped like a key."""
        if not _KEY.match(key):
            raise ValueError(f"not a file-store key: {key!r}")
        return self.root / key

    def exists(self, key: str) -> bool:
        try:
            return self.path(key).is_file()
        except ValueError:
            return False
