#!/usr/bin/env python
"""Upload-to-result latency with a warm worker (target <= 1.5 s on the 2-core dev machine).

Starts the embedded broker and a real `manage.py worker` process (prefork, 1 process),
warms it with one case, then uploads images one at a time through the app (Flask test
client: the HTTP handling, validation, storage and enqueue are real; the network is not)
and polls the JSON status endpoint every 10 ms until the case is done.

    .venv/bin/python benchmarks/upload_latency.py [--model demo/model.pt] [--n 20] [--size 500x400]

Without --model (and without demo/model.pt) it uses a random-weight ResNet18 at 128 px,
which costs the same as a trained one.
"""
from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_checkpoint(folder: Path, size: int) -> Path:
    from ml.checkpoint import save_checkpoint
    from ml.data import IMAGENET_MEAN, IMAGENET_STD, LABEL_NAMES
    from ml.model import build_model

    meta = {"architecture": "resnet18", "class_names": ["benign", "malignant", "normal"],
            "positive_classes": ["malignant"], "labels": list(LABEL_NAMES), "input_size": size,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "threshold": 0.5, "threshold_default": 0.5}
    return save_checkpoint(folder / "random.pt", build_model("none"), meta, half=True)


def png(width: int, height: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    # Smooth-ish content like an ultrasound frame (pure noise PNGs are unrealistically large).
    small = rng.integers(0, 256, size=(height // 8, width // 8), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _stages() -> dict[str, float]:
    """Median milliseconds of each stage over the measured cases, from the database."""
    from sqlalchemy import select

    from webapp.extensions import db
    from webapp.models import Case, Prediction

    rows = db.session.execute(select(Case, Prediction).join(Prediction).order_by(Case.id)).all()[2:]
    stages: dict[str, list[float]] = {"queue wait": [], "worker total": []}
    for case, prediction in rows:
        stages["queue wait"].append((case.started_at - case.created_at).total_seconds() * 1e3)
        stages["worker total"].append((case.finished_at - case.started_at).total_seconds() * 1e3)
        for name, ms in prediction.timings.items():
            stages.setdefault(name, []).append(ms)
    return {name: statistics.median(values) for name, values in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "demo" / "model.pt")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--size", default="500x400", help="image WIDTHxHEIGHT (BUSI images are about 500x450)")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))

    import flask_migrate

    from webapp import MIGRATIONS_DIR, create_app
    from webapp.accounts import create_user
    from webapp.broker import EmbeddedBroker
    from webapp.registry import register_model_version

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model if args.model.is_file() else make_checkpoint(folder, 128)
        with EmbeddedBroker(folder) as broker:
            app = create_app({"INSTANCE_PATH": str(folder), "CELERY_BROKER_URL": broker.url,
                              "WTF_CSRF_ENABLED": False})
            from ml.checkpoint import load_checkpoint

            with app.app_context():
                flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
                create_user("doc@example.org", "quiet-harbour-lamp")
                version = register_model_version(model, load_checkpoint(model)["meta"], activate=True)
                model_desc = f"{model.name} ({version.input_size} px)"
            worker = subprocess.Popen(
                [sys.executable, str(ROOT / "manage.py"), "worker", "--broker-url", broker.url, "--loglevel", "warning"],
                cwd=ROOT, env={"INSTANCE_PATH": str(folder), "PATH": "/usr/bin:/bin"})
            try:
                client = app.test_client()
                assert client.post("/login", data={"email": "doc@example.org", "password": "quiet-harbour-lamp"}).status_code == 302

                def one(seed: int, timeout: float = 120.0) -> float:
                    t0 = time.perf_counter()
                    response = client.post("/cases/upload", data={"images": [(io.BytesIO(png(width, height, seed)), "x.png")]})
                    url = response.headers["Location"] + "/status"
                    while True:
                        status = client.get(url).get_json()
                        if status["finished"]:
                            assert status["status"] == "done", status
                            return time.perf_counter() - t0
                        if time.perf_counter() - t0 > timeout:
                            raise TimeoutError(status)
                        time.sleep(0.01)

                cold = one(0)  # includes worker start-up and model load
                one(1)
                times = sorted(one(seed) for seed in range(2, 2 + args.n))
                with app.app_context():
                    stages = _stages()
            finally:
                worker.terminate()
                worker.wait(60)
                app.extensions["celery"].close()
    print(f"upload-to-result latency, warm worker (prefork, 1 process), {args.n} uploads of a "
          f"{width}x{height} PNG, model {model_desc}, Grad-CAM + faithfulness test")
    print(f"first case (worker start + model load): {cold:.2f} s")
    print(f"median {statistics.median(times):.3f} s   p95 {times[int(0.95 * len(times)) - 1]:.3f} s   "
          f"max {times[-1]:.3f} s   (target <= 1.5 s)")
    print("median per stage (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
