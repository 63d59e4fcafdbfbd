"""Input of a multi-reader multi-case (MRMC) study: rows of ratings, checked and arranged as a
fully crossed design (every reader rates every case in every modality).

A row is (reader, modality, case, truth, rating), as a tuple or a dict with those keys; a
ratings CSV has those five columns (any order, other columns ignored). Readers, modalities
and cases are labels (kept as text); truth is 1 (disease present) or 0; a rating is any number,
higher meaning more confident that disease is present. The analysis lives in ml.mrmc.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml import MLError

COLUMNS = ("reader", "modality", "case", "truth", "rating")


class MRMCError(MLError, ValueError):
    """A ratings file or list of rows that cannot be analysed, with the reason."""


@dataclass(frozen=True)
class Design:
    """A checked, fully crossed study. ratings[t, j, k]: modality t, reader j, case k."""

    modalities: tuple[str, ...]
    readers: tuple[str, ...]
    cases: tuple[str, ...]
    truth: np.ndarray  # (K,) bool, True = disease present
    ratings: np.ndarray  # (T, J, K) float


def _label(value, column: str, where: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise MRMCError(f"{where}: {column} is empty")
    text = str(value).strip()
    if not text:
        raise MRMCError(f"{where}: {column} is empty")
    return text


def _truth(value, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    try:
        number = float(str(value).strip())
    except ValueError:
        number = math.nan
    if number not in (0.0, 1.0):
        raise MRMCError(f"{where}: truth must be 0 (no disease) or 1 (disease), not {value!r}")
    return int(number)


def _rating(value, where: str) -> float:
    if isinstance(value, bool):
        raise MRMCError(f"{where}: rating must be a number, not {value!r}")
    try:
        number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        raise MRMCError(f"{where}: rating must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise MRMCError(f"{where}: rating must be a finite number, not {value!r}")
    return number


def parse_row(row, where: str) -> tuple[str, str, str, int, float]:
    """One row as (reader, modality, case, truth, rating), or MRMCError naming `where`."""
    if isinstance(row, Mapping):
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise MRMCError(f"{where}: missing {', '.join(missing)} (a row needs {', '.join(COLUMNS)})")
        values = [row[c] for c in COLUMNS]
    elif isinstance(row, Sequence) and not isinstance(row, (str, bytes)):
        if len(row) != len(COLUMNS):
            raise MRMCError(f"{where}: expected {len(COLUMNS)} values ({', '.join(COLUMNS)}), got {len(row)}")
        values = list(row)
    else:
        raise MRMCError(f"{where}: expected a tuple or dict of {', '.join(COLUMNS)}, got {type(row).__name__}")
    reader, modality, case = (_label(v, c, where) for v, c in zip(values[:3], COLUMNS[:3]))
    return reader, modality, case, _truth(values[3], where), _rating(values[4], where)


def read_ratings_csv(path: str | Path) -> list[tuple[str, str, str, int, float]]:
    """Rows of a ratings CSV with columns reader, modality, case, truth, rating (header names
    are matched without regard to case or surrounding spaces; other columns are ignored)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise MRMCError(f"{path}: the file is empty (expected a header: {','.join(COLUMNS)})")
            names = [name.strip().lower() for name in header]
            missing = [c for c in COLUMNS if c not in names]
            if missing:
                raise MRMCError(f"{path}: missing column(s) {', '.join(missing)}; the header must name "
                                f"{','.join(COLUMNS)} (found: {','.join(h.strip() for h in header)})")
            index = [names.index(c) for c in COLUMNS]
            rows = []
            for line, record in enumerate(reader, start=2):
                if not any(field.strip() for field in record):
                    continue  # blank line
                if len(record) <= max(index):
                    raise MRMCError(f"{path}, line {line}: {len(record)} fields, the header has {len(header)}")
                rows.append(parse_row([record[i] for i in index], f"{path}, line {line}"))
    except UnicodeDecodeError:
        raise MRMCError(f"{path}: not a UTF-8 text CSV file") from None
    except csv.Error as exc:
        raise MRMCError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows:
        raise MRMCError(f"{path}: no ratings below the header")
    return rows


def _first_seen(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def build_design(rows: Iterable, modalities: Sequence[str] | None = None) -> Design:
    """Check rows and arrange them as a fully crossed design. Modalities, readers and cases keep
    the order of their first appearance; `modalities` (labels) sets the modality order instead."""
    parsed = [parse_row(row, f"row {n}") for n, row in enumerate(rows, start=1)]
    if not parsed:
        raise MRMCError("no ratings were given")
    readers = _first_seen(r[0] for r in parsed)
    found = _first_seen(r[1] for r in parsed)
    cases = _first_seen(r[2] for r in parsed)
    if modalities is not None:
        order = [str(m) for m in modalities]
        if sorted(order) != sorted(found):
            raise MRMCError(f"the modality order {order} does not name exactly the modalities in the data {found}")
        found = order
    if len(found) < 2:
        raise MRMCError(f"at least 2 modalities are needed to compare them; found {len(found)} ({', '.join(found)})")
    if len(readers) < 2:
        raise MRMCError(f"at least 2 readers are needed; found {len(readers)} ({', '.join(readers)})")
    truth: dict[str, int] = {}
    for reader, modality, case, value, _ in parsed:
        if truth.setdefault(case, value) != value:
            raise MRMCError(f"case {case} has two truths (0 and 1); a case's truth must be the same in every row")
    n_pos = sum(truth.values())
    n_neg = len(truth) - n_pos
    if n_pos < 2 or n_neg < 2:
        raise MRMCError(f"at least 2 cases with truth 1 and 2 with truth 0 are needed (the jackknife leaves one "
                        f"out); found {n_pos} with disease and {n_neg} without")
    t_index = {m: i for i, m in enumerate(found)}
    j_index = {r: i for i, r in enumerate(readers)}
    k_index = {c: i for i, c in enumerate(cases)}
    ratings = np.full((len(found), len(readers), len(cases)), np.nan)
    for n, (reader, modality, case, _, rating) in enumerate(parsed, start=1):
        cell = (t_index[modality], j_index[reader], k_index[case])
        if not math.isnan(ratings[cell]):
            raise MRMCError(f"row {n}: reader {reader} rated case {case} twice in modality {modality}")
        ratings[cell] = rating
    missing = np.argwhere(np.isnan(ratings))
    if len(missing):
        t, j, k = missing[0]
        raise MRMCError(f"the design is not fully crossed: reader {readers[j]} has no rating of case {cases[k]} "
                        f"in modality {found[t]} ({len(missing)} reader × modality × case rating(s) missing); "
                        "every reader must rate every case in every modality")
    return Design(modalities=tuple(found), readers=tuple(readers), cases=tuple(cases),
                  truth=np.array([bool(truth[c]) for c in cases]), ratings=ratings)
