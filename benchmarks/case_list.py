#!/usr/bin/env python
"""Case-list latency at 100 and 10,000 cases (p50/p95 over repeated requests).

Runs the real app (SQLite file built by the migrations, templates, login) through Flask's
test client, so the figure is server time without the network. Targets (issue 4): p95 at
10,000 cases <= 50 ms and <= 1.5x the 100-case p95.

    .venv/bin/python benchmarks/case_list.py [--requests 200]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VIEWS = {
    "newest (page 1)": "/cases",
    "status=done": "/cases?status=done",
    "label=cancer": "/cases?label=cancer",
    "unreviewed": "/cases?reviewed=no",
    "probability desc": "/cases?sort=probability_desc",
}


def build(folder: Path, n: int):
    import flask_migrate

    from webapp import MIGRATIONS_DIR, create_app
    from webapp.accounts import create_user
    from webapp.extensions import db
    from webapp.models import Case, utcnow

    app = create_app({"INSTANCE_PATH": str(folder), "CELERY_BROKER_URL": "memory://", "WTF_CSRF_ENABLED": False})
    with app.app_context():
        flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        clinicians = [create_user(f"doc{i}@example.org", "password-123").id for i in range(20)]
        create_user("rev@example.org", "password-123", "reviewer")
        rng = random.Random(0)
        start = utcnow() - timedelta(days=365)
        rows = []
        for i in range(n):
            done = rng.random() < 0.9
            p = rng.random()
            rows.append(dict(uploader_id=rng.choice(clinicians), created_at=start + timedelta(minutes=i),
                             updated_at=start, status="done" if done else rng.choice(["queued", "failed"]),
                             image_sha256=f"{i:064x}", image_key=f"images/00/{i:064x}.png", image_format="PNG",
                             original_filename=f"case-{i}.png", width=500, height=400, attempts=1,
                             label=("cancer" if p >= 0.5 else "normal") if done else None,
                             probability=p if done else None, review_count=rng.choice([0, 0, 1, 2])))
        db.session.execute(db.insert(Case), rows)
        db.session.commit()
        db.session.execute(db.text("ANALYZE"))
        db.session.commit()
    return app


def measure(app, requests: int) -> dict[str, tuple[float, float]]:
    client = app.test_client()
    assert client.post("/login", data={"email": "rev@example.org", "password": "password-123"}).status_code == 302
    # A later page (the last one at 100 cases): follow "next" 3 times.
    url = "/cases"
    for _ in range(3):
        html = client.get(url).data.decode()
        url = html.split('rel="next" href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    views = dict(VIEWS, **{"newest (page 4)": url})
    out = {}
    for name, url in views.items():
        for _ in range(10):  # warm caches
            client.get(url)
        times = []
        for _ in range(requests):
            t0 = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - t0) * 1e3)
            assert response.status_code == 200
        times.sort()
        out[name] = (statistics.median(times), times[int(0.95 * len(times)) - 1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    results = {}
    for n in (100, 10_000):
        with tempfile.TemporaryDirectory() as tmp:
            results[n] = measure(build(Path(tmp), n), args.requests)
    print(f"case list, 25 per page, reviewer view, {args.requests} requests each (ms)")
    print(f"{'view':20} {'p50@100':>8} {'p95@100':>8} {'p50@10k':>8} {'p95@10k':>8} {'ratio p95':>9}")
    for name in results[100]:
        a, b = results[100][name], results[10_000][name]
        print(f"{name:20} {a[0]:8.2f} {a[1]:8.2f} {b[0]:8.2f} {b[1]:8.2f} {b[1] / a[1]:9.2f}")
    worst = max(r[1] for r in results[10_000].values())
    ratio = max(results[10_000][k][1] / results[100][k][1] for k in results[100])
    print(f"worst p95 at 10,000 cases: {worst:.1f} ms (target <= 50); worst ratio {ratio:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
