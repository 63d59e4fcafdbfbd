"""Characters that have no place in what people type into the app.

NUL cannot be stored by PostgreSQL (it used to give a 500), other control characters
move terminals and logs around, and the bidirectional controls (right-to-left override,
isolates) make text read differently from what it is ("\u202egnp.exe" shows as
"exe.png"). Tab, line feed and carriage return stay: notes have lines.
"""
from __future__ import annotations

import re
import unicodedata

# C0 controls but tab, line feed and carriage return; DEL; C1 controls; the bidi
# embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069).
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def has_forbidden_characters(text: str | None) -> bool:
    """Whether ``text`` holds NUL, another control character or a bidi control."""
    return bool(text) and _FORBIDDEN.search(text) is not None


def clean_filename(name: str) -> str:
    """``name`` without control or format characters (Unicode categories Cc and Cf: NUL,
    escapes, bidi controls, zero-width characters): a file name is for display only."""
    return "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf"))
