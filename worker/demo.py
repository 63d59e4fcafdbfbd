"""Seed a fresh installation with the bundled demo model and a few sample cases.

Runs in its own process (it reads the checkpoint with torch), never in the web server.
Safe to run again: a model already registered and images already uploaded are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from webapp.config import PROJECT_ROOT

DEMO_MODEL = PROJECT_ROOT / "demo" / "model.pt"
DEMO_IMAGES = PROJECT_ROOT / "demo" / "images"


@dataclass
class DemoOutcome:
    model: str = ""
    cases_added: list[int] = field(default_factory=list)
    cases_present: int = 0


def seed_demo(model_path: Path = DEMO_MODEL, images_dir: Path = DEMO_IMAGES) -> DemoOutcome:
    """Register ``model_path`` (active when no model is) and upload the sample images as
    cases of the first admin. Call inside an app context with the broker reachable."""
    import hashlib

    from ml.inference import Predictor
    from webapp.extensions import db
    from webapp.intake import receive_uploads
    from webapp.models import Case, ModelVersion, User
    from webapp.registry import register_model_version
    from worker.prediction import active_version

    outcome = DemoOutcome()
    checksum = hashlib.sha256(model_path.read_bytes()).hexdigest()
    version = db.session.scalar(select(ModelVersion).where(ModelVersion.checksum == checksum))
    if version is None:
        predictor = Predictor.from_checkpoint(model_path, device="cpu")
        version = register_model_version(model_path, predictor.meta, name="demo-2sites",
                                         activate=active_version() is None,
                                         notes="Research demo trained on BUSI (Egypt) and BrEaST-Lesions-USG (Poland) "
                                               "ultrasound images; not for clinical use.")
        outcome.model = f"registered {version.name}" + (" (active)" if version.is_active else "")
    else:
        outcome.model = f"{version.name} already registered"
    admin = db.session.scalar(select(User).where(User.role == "admin").order_by(User.id))
    if admin is None:
        raise RuntimeError("no admin account: run 'python manage.py init' first")
    files = []
    for path in sorted(images_dir.glob("*.png")):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if db.session.scalar(select(Case.id).where(Case.image_sha256 == digest).limit(1)) is not None:
            outcome.cases_present += 1
            continue
        files.append((path.name, data))
    if files:
        result = receive_uploads(files, "Demo case (public BUSI or BrEaST-Lesions-USG image), not a patient of this site.", admin)
        outcome.cases_added = [c.id for c in result.accepted]
    return outcome
