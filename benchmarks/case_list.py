#!/usr/bin/env python
"""Case-list and case-page latency at 100 and 10,000 cases (p50/p95 over repeated requests).

Runs the real app (SQLite file built by the migrations, templates, login) through Flask's
test client, so the figure is server time without the network. Every done case has a
prediction, about half have reviews (the list's review column), and all share one stored
image (each with its own thumbnail). Besides the list views it times the case page
(GET /cases/<id>, rotating over 50 cases, with its "case viewed" audit event), the list's
status poll (GET /cases/status?ids= the 25 ids of a page) and the thumbnail (first request
makes it; later ones serve the kept file). Targets (issues 4 and 11): p95 at 10,000 cases
<= 50 ms and <= 1.5x the 100-case p95.

    .venv/bin/python benchmarks/case_list.py [--requests 200]
"""
from __future__ import annotations

import argparse
import random
import re
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
    from webapp.models import Case, ModelVersion, Prediction, Review, utcnow

    app = create_app({"INSTANCE_PATH": str(folder), "CELERY_BROKER_URL": "memory://", "WTF_CSRF_ENABLED": False})
    with app.app_context():
        flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        clinicians = [create_user(f"doc{i}@example.org", "quiet-harbour-lamp").id for i in range(20)]
        reviewers = [create_user("rev@example.org", "quiet-harbour-lamp", "reviewer").id,
                     create_user("rev2@example.org", "quiet-harbour-lamp", "reviewer").id]
        image_key, _ = app.extensions["file_store"].put(_image(), "images", ".png")
        version = ModelVersion(name="bench", file_key="models/00/" + "0" * 64 + ".pt", checksum="0" * 64,
                               threshold=0.5, input_size=128, is_active=True, metrics={}, meta={})
        db.session.add(version)
        db.session.flush()
        rng = random.Random(0)
        start = utcnow() - timedelta(days=365)
        rows = []
        for i in range(n):
            done = rng.random() < 0.9
            p = rng.random()
            rows.append(dict(uploader_id=rng.choice(clinicians), created_at=start + timedelta(minutes=i),
                             updated_at=start, status="done" if done else rng.choice(["queued", "failed"]),
                             image_sha256=f"{i:064x}", image_key=image_key, image_format="PNG",
                             original_filename=f"case-{i}.png", width=500, height=400, attempts=1,
                             label=("cancer" if p >= 0.5 else "normal") if done else None,
                             probability=p if done else None, review_count=rng.choice([0, 0, 1, 2])))
        db.session.execute(db.insert(Case), rows)
        db.session.flush()
        cases = db.session.execute(db.select(Case.id, Case.label, Case.probability, Case.review_count)
                                   .where(Case.status == "done")).all()
        now = utcnow()
        db.session.execute(db.insert(Prediction), [
            dict(case_id=c, model_version_id=version.id, probability=p, label=label, threshold=0.5, method="gradcam",
                 timings={}, created_at=now, updated_at=now) for c, label, p, _ in cases])
        db.session.flush()
        predictions = dict(db.session.execute(db.select(Prediction.case_id, Prediction.id)).all())
        reviews = []
        for c, label, p, count in cases:
            for reviewer in reviewers[:count]:
                said = label if rng.random() < 0.8 else ("normal" if label == "cancer" else "cancer")
                reviews.append(dict(case_id=c, reviewer_id=reviewer, prediction_id=predictions[c],
                                    model_version_id=version.id, model_label=label, model_probability=p,
                                    verdict="agree" if said == label else "disagree", label=said, confidence="certain",
                                    revision=1, created_at=now, updated_at=now, submitted_at=now))
        if reviews:
            db.session.execute(db.insert(Review), reviews)
        db.session.commit()
        db.session.execute(db.text("ANALYZE"))
        db.session.commit()
    return app


def _image() -> bytes:
    """A 500 x 400 PNG of noise (the size of a typical upload's long side, halved)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(400, 500), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _timed(client, urls: list[str], requests: int, warm: int = 10) -> tuple[float, float]:
    """p50 and p95 in ms of ``requests`` GETs cycling through ``urls`` (after ``warm`` unmeasured)."""
    for i in range(warm):
        client.get(urls[i % len(urls)])
    times = []
    for i in range(requests):
        t0 = time.perf_counter()
        response = client.get(urls[i % len(urls)])
        times.append((time.perf_counter() - t0) * 1e3)
        assert response.status_code == 200, (urls[i % len(urls)], response.status_code)
    times.sort()
    return statistics.median(times), times[max(0, int(0.95 * len(times)) - 1)]


def measure(app, requests: int) -> dict[str, tuple[float, float]]:
    client = app.test_client()
    assert client.post("/login", data={"email": "rev@example.org", "password": "quiet-harbour-lamp"}).status_code == 302
    # A later page (the last one at 100 cases): follow "next" 3 times.
    url = "/cases"
    for _ in range(3):
        html = client.get(url).data.decode()
        url = html.split('rel="next" href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    views = dict(VIEWS, **{"newest (page 4)": url})
    out = {name: _timed(client, [url], requests) for name, url in views.items()}
    first_page = [int(x) for x in re.findall(r'data-case-id="(\d+)"', client.get("/cases").data.decode())]
    assert len(first_page) == 25
    from webapp.extensions import db
    from webapp.models import Case

    with app.app_context():
        done = db.session.scalars(db.select(Case.id).where(Case.status == "done").order_by(Case.id.desc())
                                  .limit(50)).all()
    out["case page"] = _timed(client, [f"/cases/{i}" for i in done], requests)
    out["status poll (25)"] = _timed(client, ["/cases/status?ids=" + ",".join(map(str, first_page))], requests)
    # Thumbnails: the first request of each case makes its JPEG (no warm-up), then it is kept.
    cold = [f"/cases/{i}/thumbnail" for i in dict.fromkeys(first_page + done)]
    out["thumbnail, first"] = _timed(client, cold, min(requests, len(cold)), warm=0)
    out["thumbnail, kept"] = _timed(client, cold, requests)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    results = {}
    for n in (100, 10_000):
        with tempfile.TemporaryDirectory() as tmp:
            results[n] = measure(build(Path(tmp), n), args.requests)
    print(f"case list (25 per page), case page, status poll, thumbnail; reviewer view; {args.requests} requests each (ms)")
    print(f"{'view':20} {'p50@100':>8} {'p95@100':>8} {'p50@10k':>8} {'p95@10k':>8} {'ratio p95':>9}")
    for name in results[100]:
        a, b = results[100][name], results[10_000][name]
        print(f"{name:20} {a[0]:8.2f} {a[1]:8.2f} {b[0]:8.2f} {b[1]:8.2f} {b[1] / a[1]:9.2f}")
    worst = max(r[1] for r in results[10_000].values())
    ratio = max(results[10_000][k][1] / results[100][k][1] for k in results[100])
    print(f"worst p95 at 10,000 cases: {worst:.1f} ms (target <= 50); worst ratio {ratio:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
