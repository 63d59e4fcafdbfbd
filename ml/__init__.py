"""Model side of the breast-review app: data, the classifier (ResNet18 or EfficientNet-Lite0), training, metrics,
explanations and export.

A plain library: nothing here imports the web app or the worker, so every function can be
used from a notebook.
"""

__all__ = ["ARCHITECTURES", "MLError"]

# The networks a checkpoint may hold (ml.model.build_model; a checkpoint's "architecture").
ARCHITECTURES = ("resnet18", "efficientnet_lite0")


class MLError(Exception):
    """Base class for errors a user can cause (bad data, bad checkpoint, bad option)."""
