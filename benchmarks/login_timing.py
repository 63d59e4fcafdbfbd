#!/usr/bin/env python
"""Time of a refused sign-in by reason: unknown email, wrong password, deactivated account,
throttled (too many failures from this address), against a successful one.

Issue 10 item 7: before, an unknown email answered in ~5 ms and a known one in ~108 ms,
which told an attacker which accounts exist. Every refusal now runs the same password
hash (a decoy one for unknown emails) and writes the same rows.

    .venv/bin/python benchmarks/login_timing.py [--n 30]

Real app and SQLite database in a temporary folder, through the Flask test client.
Prints the median and the 10th-90th percentile per reason, in milliseconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="attempts per reason")
    args = parser.parse_args()

    import flask_migrate

    from webapp import MIGRATIONS_DIR, create_app
    from webapp.accounts import create_user, deactivate, find_user

    with tempfile.TemporaryDirectory() as folder:
        # Throttling off except where measured, so that every attempt reaches its own case.
        app = create_app({"INSTANCE_PATH": folder, "CELERY_BROKER_URL": "memory://", "WTF_CSRF_ENABLED": False,
                          "LOGIN_MAX_FAILURES": 3, "LOGIN_MAX_FAILURES_PER_ADDRESS": 0})
        with app.app_context():
            flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
            create_user("doc@example.org", "right password 1")
            create_user("gone@example.org", "right password 1")
            deactivate(find_user("gone@example.org"))

        def timed(address: str, email: str, password: str, expect: int) -> float:
            client = app.test_client()
            client.environ_base["REMOTE_ADDR"] = address
            start = time.perf_counter()
            response = client.post("/login", data={"email": email, "password": password})
            elapsed = (time.perf_counter() - start) * 1000
            assert response.status_code == expect, (email, response.status_code)
            return elapsed

        for _ in range(3):  # the throttled address
            timed("10.9.9.9", "doc@example.org", "wrong password 1", 401)
        cases = {
            "unknown email": lambda i: timed(f"10.1.0.{i % 250}", f"nobody{i}@example.org", "some password", 401),
            "wrong password": lambda i: timed(f"10.2.{i}.1", "doc@example.org", "wrong password 1", 401),
            "deactivated": lambda i: timed(f"10.3.{i}.1", "gone@example.org", "right password 1", 401),
            "throttled": lambda i: timed("10.9.9.9", "doc@example.org", "right password 1", 401),
            "success": lambda i: timed(f"10.4.{i}.1", "doc@example.org", "right password 1", 302),
        }
        timed("10.0.0.1", "warm@example.org", "warm up please", 401)
        results = {name: [] for name in cases}
        for i in range(args.n):  # interleaved, so that machine load affects all alike
            for name, run in cases.items():
                results[name].append(run(i))
        print(f"sign-in time by outcome, {args.n} attempts each (ms): median [p10-p90]")
        for name, times in results.items():
            deciles = statistics.quantiles(times, n=10)
            print(f"  {name:15} {statistics.median(times):7.1f}  [{deciles[0]:.1f}-{deciles[-1]:.1f}]")


if __name__ == "__main__":
    main()
