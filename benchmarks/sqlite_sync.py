#!/usr/bin/env python
"""Cost of SQLite synchronous=FULL against NORMAL under WAL, per committed transaction.

Issue 10 item 13: the app runs FULL so that a commit (a review) survives a power loss.
This times small committed transactions (an insert of a review-sized row each) in a
temporary file on the same disk as the instance folder, in both modes.

    .venv/bin/python benchmarks/sqlite_sync.py [--n 500] [--dir instance]
"""
from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time


def run(folder: str, mode: str, n: int) -> list[float]:
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".db") as tmp:
        connection = sqlite3.connect(tmp.name, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={mode}")
        connection.execute("CREATE TABLE review (id INTEGER PRIMARY KEY, case_id INTEGER, comment TEXT)")
        times = []
        for i in range(n):
            start = time.perf_counter()
            connection.execute("BEGIN")
            connection.execute("INSERT INTO review (case_id, comment) VALUES (?, ?)", (i, "x" * 200))
            connection.execute("COMMIT")
            times.append((time.perf_counter() - start) * 1000)
        connection.close()
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: the temp folder)")
    args = parser.parse_args()
    for mode in ("NORMAL", "FULL", "NORMAL", "FULL"):  # twice, interleaved: shared machines vary
        times = run(args.dir, mode, args.n)
        print(f"synchronous={mode:6}  median {statistics.median(times):.3f} ms/commit  "
              f"p95 {statistics.quantiles(times, n=20)[-1]:.3f} ms")


if __name__ == "__main__":
    main()
