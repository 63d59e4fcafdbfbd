"""Reading a torch file safely: the bottom of ``ml/``'s checkpoint handling, used by the
architectures (starting weights from a file) and by :mod:`ml.checkpoint` alike.

Files are read with ``torch.load(weights_only=True)`` so a foreign pickle cannot run code;
every failure becomes a :class:`CheckpointError` that says why.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from ml import MLError


class CheckpointError(MLError):
    """The file is missing, truncated, foreign, or its metadata is inconsistent."""


def read_checkpoint_file(path: str | Path) -> Any:
    """Read a torch file safely, turning every failure into a CheckpointError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path} is truncated or not a torch file ({exc})") from exc
    except RuntimeError as exc:
        msg = str(exc)
        reason = "truncated or corrupt" if ("zip" in msg or "archive" in msg or "central directory" in msg) else "unreadable"
        raise CheckpointError(f"{path} is {reason}: {msg.splitlines()[0]}") from exc
    except Exception as exc:  # pickle.UnpicklingError for foreign objects, and the like
        raise CheckpointError(
            f"{path} is not a checkpoint of this project ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
