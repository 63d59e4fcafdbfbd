"""Model side of the breast-review app: data, ResNet18 classifier, training, metrics,
explanations and export.

A plain library: nothing here imports the web app or the worker, so every function can be
used from a notebook.
"""

__all__ = ["MLError"]


class MLError(Exception):
    """Base class for errors a user can cause (bad data, bad checkpoint, bad option)."""
