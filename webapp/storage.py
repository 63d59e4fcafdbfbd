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


class FileStore:
    """A folder of immutable files named by their sha256."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def put(self, data: bytes, kind: str, suffix: str) -> tuple[str, str]:
        """Store ``data`` (idempotent) and return ``(key, sha256 hex digest)``."""
        digest = hashlib.sha256(data).hexdigest()
        key = f"{kind}/{digest[:2]}/{digest}{suffix.lower()}"
        path = self.path(key)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
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
        return key, digest

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
