"""Finished cases for the review, statistics and export tests, written straight to the
real database (the worker that normally writes them is tested in tests/worker)."""
from __future__ import annotations

from tests.appfixtures import add_user, image_bytes, login


def model_version(app, name: str = "m1", threshold: float = 0.5, active: bool = True) -> int:
    """A ModelVersion row (no checkpoint file: these tests never predict)."""
    from webapp.extensions import db
    from webapp.models import ModelVersion

    with app.app_context():
        version = ModelVersion(name=name, file_key=f"models/{name}.pt", checksum=name.ljust(64, "0"),
                               threshold=threshold, input_size=32, is_active=active, metrics={}, meta={})
        db.session.add(version)
        db.session.commit()
        return version.id


def finished_case(app, version_id: int, probability: float, threshold: float = 0.5, seed: int = 0,
                  uploader_email: str = "doc@example.org", data: bytes | None = None) -> int:
    """A case with a stored image (``data``, else a random PNG from ``seed``) and a finished
    prediction; returns the case id."""
    from webapp.accounts import find_user
    from webapp.extensions import db
    from webapp.models import Case, Prediction

    with app.app_context():
        data = image_bytes(size=(40, 32), seed=seed) if data is None else data
        key, digest = app.extensions["file_store"].put(data, "images", ".png")
        label = "cancer" if probability >= threshold else "normal"
        case = Case(uploader_id=find_user(uploader_email).id, status="done", image_sha256=digest, image_key=key,
                    image_format="PNG", original_filename=f"scan-{seed}.png", width=40, height=32,
                    label=label, probability=probability)
        db.session.add(case)
        db.session.flush()
        db.session.add(Prediction(case_id=case.id, model_version_id=version_id, probability=probability,
                                  label=label, threshold=threshold, method="gradcam", timings={}))
        db.session.commit()
        return case.id


def review(app, case_id: int, email: str, verdict: str, label: str | None = None,
           confidence: str = "certain", comment: str | None = None, seconds_ago: float = 30.0):
    """Submit a review through the same function as the page, opened ``seconds_ago``."""
    import time

    from webapp.accounts import find_user
    from webapp.extensions import db
    from webapp.models import Case
    from webapp.reviews import reading_token, submit_review

    with app.app_context():
        user = find_user(email)
        token = reading_token(case_id, user.id, time.time() - seconds_ago)
        return submit_review(db.session.get(Case, case_id), user, verdict, label, confidence, comment, token).id


PEOPLE = (("doc@example.org", "clinician"), ("doc2@example.org", "clinician"), ("rev@example.org", "reviewer"),
          ("rev2@example.org", "reviewer"), ("boss@example.org", "admin"))


def add_people(app):
    """Two clinicians, two reviewers and an admin (see PEOPLE); returns ``app``."""
    for email, role in PEOPLE:
        add_user(app, email, role)
    return app


def signed_in(app, email: str):
    """A test client signed in as ``email``."""
    client = app.test_client()
    login(client, email)
    return client
