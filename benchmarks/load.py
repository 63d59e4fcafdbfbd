#!/usr/bin/env python
"""Load: N clients x M mixed requests (uploads, case-list views, reviews) against a real server.

Issue 10, "Proof". A fresh instance folder; `manage.py init` builds the database (SQLite,
or with --postgres a new PostgreSQL database on 127.0.0.1:5432, user postgres, dropped at
the end); accounts are made with the app's own `create_user`; a random-weight ResNet18 is
registered; then `manage.py run` serves it (werkzeug, threaded, with the embedded broker
and one prefork worker: the laptop set-up) on a free port. Seed cases are uploaded and
predicted first, so that there is something to review.

Each client is one clinician and one reviewer (two sessions: requests with real cookies
and CSRF tokens over HTTP) and makes --requests requests, chosen at random:
uploads (one PNG, expect 303), list views (/cases with a sort or filter, /reviews; expect
200), and reviews (the case page, expect 200, then POST the review with its opening token,
expect 303). At the end it waits for every case to be final and counts rows.

    .venv/bin/python benchmarks/load.py [--clients 8] [--requests 200] [--postgres]

Prints requests, failures, p50/p95/max latency per kind, and rows expected vs found.
Target: 0 failures, p95 <= 500 ms.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from faults import free_port, make_checkpoint, pctl, png  # noqa: E402

PASSWORD = "load-bench-Qw8-2024"  # passes the password rule (>= 12 characters, not common)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
CSRF = re.compile(r'name="csrf_token"[^>]*?value="([^"]+)"')
OPENED = re.compile(r'name="opened" value="([^"]+)"')
LIST_URLS = ["/cases", "/cases?sort=probability_desc", "/cases?status=done", "/cases?sort=oldest", "/cases?reviewed=no"]


def _pg(sql: str) -> None:
    import psycopg2

    connection = psycopg2.connect(PG_ADMIN)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(sql)
    connection.close()


class Client:
    """One signed-in session over HTTP; its CSRF token is read from a page."""

    def __init__(self, base: str, email: str):
        import requests

        self.base, self.session = base, requests.Session()
        page = self.session.get(base + "/login")
        token = CSRF.search(page.text).group(1)
        response = self.session.post(base + "/login", data={"email": email, "password": PASSWORD,
                                                            "csrf_token": token}, allow_redirects=False)
        assert response.status_code == 302, (email, response.status_code, response.text[:500])
        self.csrf = CSRF.search(self.session.get(base + "/cases").text).group(1)

    def get(self, path: str):
        return self.session.get(self.base + path, allow_redirects=False, timeout=60)

    def post(self, path: str, data: dict, files=None):
        return self.session.post(self.base + path, data={**data, "csrf_token": self.csrf}, files=files,
                                 allow_redirects=False, timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL on 127.0.0.1:5432 instead of SQLite")
    parser.add_argument("--seed-cases", type=int, default=16, help="cases predicted before the run (to review)")
    parser.add_argument("--mix", default="upload=0.25,list=0.45,review=0.30", help="share of each kind of action")
    parser.add_argument("--size", default="500x400", help="uploaded image WIDTHxHEIGHT")
    parser.add_argument("--input-size", type=int, default=224, help="model input size (px) of the random model")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server log)")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}

    tmp = tempfile.mkdtemp(prefix="load-")
    folder = Path(tmp)
    instance = folder / "instance"
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "STORAGE_DIR", "SECRET_KEY", "CELERY_BROKER_URL", "TASK_QUEUE")}
    env.update(INSTANCE_PATH=str(instance), WORKER_TORCH_THREADS="1", PYTHONUNBUFFERED="1",
               ADMIN_EMAIL="admin@example.org", ADMIN_PASSWORD=PASSWORD)
    db_name = None
    if args.postgres:
        db_name = f"loadbench_{os.getpid()}"
        _pg(f'CREATE DATABASE "{db_name}"')
        env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:5432/{db_name}"
    os.environ.update(env)

    server = None
    log = (folder / "server.log").open("w")
    try:
        subprocess.run([sys.executable, str(ROOT / "manage.py"), "init"], cwd=ROOT, env=env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
        from sqlalchemy import func, select

        from webapp import create_app
        from webapp.accounts import create_user
        from webapp.extensions import db
        from webapp.models import Case, Prediction, Review, ReviewRevision
        from webapp.registry import register_model_version

        app = create_app({"CELERY_BROKER_URL": "memory://"})  # rows only; the server sends the jobs
        with app.app_context():
            for i in range(args.clients):
                create_user(f"clin{i}@example.org", PASSWORD, "clinician")
                create_user(f"rev{i}@example.org", PASSWORD, "reviewer")
            checkpoint, meta = make_checkpoint(folder, args.input_size)
            register_model_version(checkpoint, meta, name="load-random", activate=True)
            db.session.remove()

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "run", "--port", str(port)],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        import requests

        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"the server did not come up; log: {folder / 'server.log'}")
            time.sleep(0.3)

        def wait_final(timeout: float) -> tuple[int, int]:
            deadline = time.monotonic() + timeout
            while True:
                with app.app_context():
                    total = db.session.scalar(select(func.count(Case.id)))
                    final = db.session.scalar(select(func.count(Case.id)).where(Case.status.in_(("done", "failed"))))
                    db.session.remove()
                if final == total or time.monotonic() > deadline:
                    return total, final
                time.sleep(0.5)

        seeder = Client(base, "clin0@example.org")
        t0 = time.monotonic()
        for s in range(args.seed_cases):
            response = seeder.post("/cases/upload", {}, files={"images": (f"seed{s}.png", png(width, height, 10_000 + s),
                                                                          "image/png")})
            assert response.status_code == 303, response.status_code
        wait_final(180)
        with app.app_context():
            seeded = db.session.scalars(select(Case.id).where(Case.status == "done")).all()
            db.session.remove()
        print(f"server up; {len(seeded)} seed cases predicted in {time.monotonic() - t0:.1f} s "
              f"(first includes worker start and model load)", flush=True)

        latencies: dict[str, list[float]] = defaultdict(list)
        failures: dict[str, list[str]] = defaultdict(list)
        uploads_ok = [0]
        reviewed_pairs: set[tuple[int, str]] = set()
        review_posts_ok = [0]
        lock = threading.Lock()

        def timed(kind: str, call, expect: int):
            t = time.perf_counter()
            try:
                response = call()
                ok = response.status_code == expect
                why = f"{response.status_code}"
            except Exception as exc:  # a refused or reset connection is a failure too
                response, ok, why = None, False, repr(exc)[:120]
            elapsed = time.perf_counter() - t
            with lock:
                latencies[kind].append(elapsed)
                if not ok:
                    failures[kind].append(why)
            return response if ok else None

        def run_client(i: int) -> None:
            rng = random.Random(i)
            clinician = Client(base, f"clin{i}@example.org")
            reviewer = Client(base, f"rev{i}@example.org")
            done = 0
            n = 0
            while done < args.requests:
                n += 1
                kind = rng.choices(list(mix), weights=list(mix.values()))[0]
                if kind == "upload":
                    data = png(width, height, 100_000 * (i + 1) + n)
                    if timed("upload", lambda: clinician.post("/cases/upload", {"note": f"load {i}-{n}"},
                                                               files={"images": (f"{i}-{n}.png", data, "image/png")}),
                             303) is not None:
                        with lock:
                            uploads_ok[0] += 1
                    done += 1
                elif kind == "list":
                    who = clinician if rng.random() < 0.5 else reviewer
                    path = rng.choice(LIST_URLS + (["/reviews"] if who is reviewer else []))
                    timed("list", lambda: who.get(path), 200)
                    done += 1
                else:
                    case_id = rng.choice(seeded)
                    page = timed("case page", lambda: reviewer.get(f"/cases/{case_id}"), 200)
                    done += 1
                    if page is None or done >= args.requests:
                        continue
                    match = OPENED.search(page.text)
                    if match is None:
                        with lock:
                            failures["review"].append("no review form on the case page")
                        continue
                    form = {"verdict": "agree", "confidence": rng.choice(["certain", "probable", "unsure"]),
                            "comment": f"load {i}-{n}", "opened": match.group(1).replace("&#34;", '"')}
                    if timed("review", lambda: reviewer.post(f"/cases/{case_id}/review", form), 303) is not None:
                        with lock:
                            reviewed_pairs.add((case_id, f"rev{i}"))
                            review_posts_ok[0] += 1
                    done += 1

        threads = [threading.Thread(target=run_client, args=(i,)) for i in range(args.clients)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start
        total, final = wait_final(180)
        with app.app_context():
            found = {
                "cases": total,
                "final cases": final,
                "predictions": db.session.scalar(select(func.count(Prediction.id))),
                "reviews": db.session.scalar(select(func.count(Review.id))),
                "review revisions": db.session.scalar(select(func.count(ReviewRevision.id))),
                "review_count sum": db.session.scalar(select(func.sum(Case.review_count))) or 0,
            }
            failed_cases = db.session.scalar(select(func.count(Case.id)).where(Case.status == "failed"))
            db.session.remove()
        expected_cases = len(seeded) + uploads_ok[0]
        expected = {"cases": expected_cases, "final cases": expected_cases, "predictions": expected_cases,
                    "reviews": len(reviewed_pairs), "review revisions": review_posts_ok[0],
                    "review_count sum": len(reviewed_pairs)}
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)  # `run` stops its worker and saves the broker
            try:
                server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
        if db_name:
            try:
                from webapp.extensions import db as _db

                with app.app_context():
                    _db.engine.dispose()
            except Exception:
                pass
            _pg(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

    n_requests = sum(len(v) for v in latencies.values())
    n_failures = sum(len(v) for v in failures.values())
    every = [x for v in latencies.values() for x in v]
    print()
    print(f"load run on {'PostgreSQL' if args.postgres else 'SQLite'}: manage.py run (werkzeug, threaded; embedded "
          f"broker; 1 prefork worker, random ResNet18 at {args.input_size} px), {args.clients} clients x "
          f"{args.requests} requests, {width}x{height} PNG uploads, {elapsed:.1f} s "
          f"({n_requests / elapsed:.1f} requests/s)")
    print(f"requests {n_requests}, failures {n_failures}")
    print(f"{'kind':10s} {'n':>5s} {'fail':>5s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}")
    for kind in ("upload", "list", "case page", "review"):
        values = latencies.get(kind, [])
        if values:
            print(f"{kind:10s} {len(values):5d} {len(failures.get(kind, [])):5d} {pctl(values, 0.5) * 1e3:8.0f} "
                  f"{pctl(values, 0.95) * 1e3:8.0f} {max(values) * 1e3:8.0f}")
    print(f"{'all':10s} {len(every):5d} {n_failures:5d} {pctl(every, 0.5) * 1e3:8.0f} "
          f"{pctl(every, 0.95) * 1e3:8.0f} {max(every) * 1e3:8.0f}")
    for kind, whys in failures.items():
        print(f"  failures {kind}: {sorted(set(whys))[:5]}")
    print("rows expected vs found:")
    for key in expected:
        mark = "" if expected[key] == found[key] else "   <-- differs"
        print(f"  {key:18s} {expected[key]:6d} {found[key]:6d}{mark}")
    print(f"  failed cases: {failed_cases}")
    worst = max(pctl(v, 0.95) for v in latencies.values())
    ok = n_failures == 0 and worst <= 0.5 and expected == found
    print("target (0 failures, p95 <= 500 ms per kind, rows as expected):", "met" if ok else "NOT met")
    if args.keep or not ok:
        print("server log and instance kept in", tmp)
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
