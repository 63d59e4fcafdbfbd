"""How figures read on the pages: counts as integers, rates to three decimals, mappings
as "key: value" lists (never a Python repr)."""
from __future__ import annotations

import math
from typing import Any

# Keys whose values are counts even when a JSON round trip or an average made them floats.
COUNT_KEYS = {"n", "n_positive", "n_negative", "tp", "fp", "tn", "fn", "epoch", "epochs", "best_epoch", "files",
              "images", "cases", "reviews", "count", "support", "positives", "negatives", "seed", "input_size"}


def figure(value: Any, key: str | None = None) -> str:
    """One value as a reader should see it: ``–`` for nothing or NaN, ``137`` for a count,
    ``0.933`` for a rate, ``benign: 12, normal: 3`` for a mapping, items joined for a list."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        is_count = key is not None and (key in COUNT_KEYS or key.startswith("n_") or key.endswith("_count"))
        return str(int(round(value))) if is_count and value.is_integer() else f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')}: {figure(v, k)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(figure(v, key) for v in value) or "none"
    return str(value)


# The model's verdict at the threshold and its most likely class, in the reader's words.
VERDICT_WORDS = {"cancer": "Suspicious for malignancy", "normal": "Not suspicious"}
CLASS_WORDS = {"normal": "no lesion", "benign": "benign-appearing", "malignant": "malignant-appearing",
               "cancer": "malignant-appearing"}


def verdict_words(label: str | None) -> str:
    """``cancer`` / ``normal`` as the case page words the verdict."""
    return VERDICT_WORDS.get(label or "", label or "–")


def class_words(name: str | None) -> str:
    """A class folder name (normal / benign / malignant) as the case page words it."""
    return CLASS_WORDS.get((name or "").lower(), name or "–")
