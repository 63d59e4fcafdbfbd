#!/usr/bin/env python
"""Worker and web peak memory for near-limit images (issue 10, item 4; issue 31, item 3).

Makes N PNGs of SIZE x SIZE grey pixels (smooth content, so the files are small, as in
the report: ten 6300 x 6300 PNGs in about 1.3 MB), stores them as cases through the
upload code (no broker: they wait in the outbox), then runs the worker's own code path
(`worker.prediction.predict_case`, model loading included) on each case in a fresh child
process and prints that child's peak resident memory (VmHWM of /proc/self/status).
Then, in another fresh process, the web app's thumbnails of all of them, requested
``--parallel`` at a time (16: a case list page asking for its thumbnails), and that
process's peak. ``--bits 16`` makes 16-bit greyscale PNGs (0.1 MB each at 6300 x 6300).
Targets: worker <= 1.5 GB, web process <= 600 MB.

    .venv/bin/python benchmarks/big_images.py [--model demo/model.pt] [--n 10] [--size 6300] [--bits 16] [--parallel 16]
"""
from __future__ import annotations

import argparse
import io
import resource
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def big_pngs(n: int, size: int, bits: int = 8) -> list[bytes]:
    """``n`` different PNG files with the same smooth picture: encoded once, then made
    distinct by a text chunk (the store keeps files by content)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    scale, kind = (256, np.uint16) if bits == 16 else (1, np.uint8)
    pixels = ((128 + 60 * np.sin(x / 400) * np.cos(y / 300)) * scale).astype(kind)
    pixels[size // 3:size // 2, size // 3:size // 2] = 30 * scale  # a dark "lesion"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9)
    base = buffer.getvalue()
    del pixels, x, y
    files = []
    for i in range(n):
        body = b"Comment\0" + f"image {i}".encode()
        chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
        files.append(base[:33] + chunk + base[33:])  # after the signature and IHDR
    return files


def setup(folder: Path, n: int, size: int, model: Path | None, bits: int = 8) -> None:
    import flask_migrate

    from webapp import MIGRATIONS_DIR, create_app

    app = create_app(_config(folder))
    with app.app_context():
        flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        from ml.inference import Predictor
        from webapp.accounts import create_user
        from webapp.intake import receive_uploads
        from webapp.registry import register_model_version

        if model is None:
            from benchmarks.upload_latency import make_checkpoint

            model = make_checkpoint(folder, 224)
        register_model_version(model, Predictor.from_checkpoint(model, device="cpu").meta, activate=True)
        user = create_user("bench@example.org", "bench-password-123", "clinician")
        files = big_pngs(n, size, bits)
        print(f"{n} {bits}-bit PNGs of {size} x {size}: {sum(map(len, files)) / 1e6:.2f} MB in all")
        outcome = receive_uploads([(f"big-{i}.png", data) for i, data in enumerate(files)], None, user)
        assert len(outcome.accepted) == n, outcome.rejected


def _config(folder: Path) -> dict:
    return {"INSTANCE_PATH": str(folder), "SQLALCHEMY_DATABASE_URI": f"sqlite:///{folder / 'app.db'}",
            # A real broker and a queue nobody consumes: the jobs are run by hand below.
            "CELERY_BROKER_URL": "redis://127.0.0.1:6379/15", "TASK_QUEUE": f"bench-{folder.name}",
            "WORKER_DEVICE": "cpu"}


def child(folder: Path) -> None:
    """The worker's side: predict every case, then report this process's peak memory."""
    import ml.explain  # noqa: F401  (the worker imports these before forking its pool)
    import ml.inference  # noqa: F401
    from webapp import create_app
    from worker.prediction import predict_case

    start_rss = _peak_mb()
    app = create_app(_config(folder))
    with app.app_context():
        from sqlalchemy import select

        from webapp.extensions import db
        from webapp.models import Case

        ids = db.session.scalars(select(Case.id).order_by(Case.id)).all()
        t0 = time.perf_counter()
        statuses = [predict_case(i) for i in ids]
        elapsed = time.perf_counter() - t0
    peak = _peak_mb()
    print(f"cases: {len(ids)}, statuses: {sorted(set(statuses))}, time {elapsed:.1f} s")
    print(f"worker peak RSS: {peak:.0f} MB (after imports: {start_rss:.0f} MB)")


def web_child(folder: Path, parallel: int) -> None:
    """The web app's side: every case's thumbnail, ``parallel`` requests at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from webapp import create_app
    from webapp.caselist import thumbnail_path

    start_rss = _peak_mb()
    app = create_app(_config(folder))
    store = app.extensions["file_store"]

    def one(case_id: int):
        with app.app_context():
            from webapp.extensions import db
            from webapp.models import Case

            return thumbnail_path(store, db.session.get(Case, case_id))

    with app.app_context():
        from sqlalchemy import select

        from webapp.extensions import db
        from webapp.models import Case

        ids = db.session.scalars(select(Case.id).order_by(Case.id)).all()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        made = [p is not None for p in pool.map(one, ids)]
    print(f"thumbnails: {sum(made)} of {len(ids)}, {parallel} at a time, {time.perf_counter() - t0:.1f} s")
    print(f"web peak RSS: {_peak_mb():.0f} MB (after imports: {start_rss:.0f} MB)")


def _peak_mb() -> float:
    """This process's peak resident memory in MB. VmHWM from /proc belongs to the process's
    own address space, so it starts afresh at exec; ru_maxrss would carry the parent's peak
    (making these big test images) over the exec (getrusage(2): kept across execve)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "demo" / "model.pt")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--size", type=int, default=6300)
    parser.add_argument("--bits", type=int, choices=(8, 16), default=8)
    parser.add_argument("--parallel", type=int, default=16, help="thumbnail requests at a time (0: skip the web side)")
    parser.add_argument("--no-worker", action="store_true", help="measure the web side only")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--web-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.web_child:
        web_child(args.web_child, args.parallel)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        setup(folder, args.n, args.size, args.model if args.model.is_file() else None, args.bits)
        if not args.no_worker:
            subprocess.run([sys.executable, __file__, "--child", str(folder)], check=True)
        if args.parallel:
            subprocess.run([sys.executable, __file__, "--web-child", str(folder), "--parallel", str(args.parallel)],
                           check=True)


if __name__ == "__main__":
    main()
