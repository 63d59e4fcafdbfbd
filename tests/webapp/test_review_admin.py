"""Admin pages of the loop: model card with ROC curve, audit log of reviews and role changes."""
from __future__ import annotations

from tests.appfixtures import add_user, login
from tests.webapp.reviewdata import finished_case, model_version, review


def test_model_card_page_and_roc_image(app, client):
    from webapp.extensions import db
    from webapp.models import ModelVersion

    add_user(app, "boss@example.org", "admin")
    add_user(app, "rev@example.org", "reviewer")
    parent = model_version(app, "v1")
    child = model_version(app, "v2", active=False)
    with app.app_context():
        key, _ = app.extensions["file_store"].put(b"\x89PNG fake roc", "reports", ".png")
        version = db.session.get(ModelVersion, child)
        version.parent_id = parent
        version.meta = {"roc_key": key, "locked_test": {"roc_auc": 0.812, "roc_auc_ci": [0.7, 0.9], "n": 16,
                                                        "n_positive": 8, "sensitivity": 0.875},
                        "compared_with": {"version": "v1", "locked_test": {"roc_auc": 0.75}},
                        "training_data": {"n_base": 32, "n_feedback": 4},
                        "input_size": 128, "resize": "letterbox-bilinear", "layer4_stride": 1, "input_norm": "image",
                        "args": {"masks": "/data/masks", "mask_weight": 1.0, "mixstyle": 0.0, "randconv": 0.5},
                        "ensemble": {"members": [{"seed": 0, "epoch": 33}, {"seed": 1, "epoch": 70}]},
                        "promotion": {"mode": "auto", "promote": False, "reasons": ["sensitivity below"]}}
        db.session.commit()
    login(client, "boss@example.org")
    assert b'href="/admin/models/v2"' in client.get("/admin/models").data
    page = client.get("/admin/models/v2").data.decode()
    assert "NOT for clinical use" in page and "Intended use" in page and "Limitations" in page
    assert "0.812 (95% CI 0.700–0.900)" in page and "0.750" in page and "n feedback" in page
    assert 'href="/admin/models/v1"' in page and "not promoted" in page
    assert "128 × 128 px, letterboxed" in page and "8 × 8 (layer4 stride 1)" in page
    assert "radiologists&#39; outlines (weight 1)" in page and "mixstyle" not in page   # MixStyle was off
    assert "p 0.5 (random-filter textures blended into training images)" in page
    assert "each image standardised to its own mean and spread" in page
    assert "2 networks trained alike (seeds 0, 1; best epochs 33, 70), their outputs averaged" in page
    roc = client.get("/admin/models/v2/roc.png")
    assert roc.status_code == 200 and roc.mimetype == "image/png"
    assert client.get("/admin/models/v1/roc.png").status_code == 404
    assert client.get("/admin/models/nope").status_code == 404
    client.post("/logout")
    login(client, "rev@example.org")
    assert client.get("/admin/models/v2").status_code == 403


def test_audit_log_shows_reviews_and_role_changes(app, client):
    add_user(app, "doc@example.org")
    add_user(app, "rev@example.org", "reviewer")
    add_user(app, "boss@example.org", "admin")
    case_id = finished_case(app, model_version(app), 0.7)
    review(app, case_id, "rev@example.org", "agree")
    login(client, "boss@example.org")
    client.post("/admin/users/1/role", data={"role": "reviewer"})
    page = client.get("/admin/audit").data.decode()
    assert "review.submit" in page and "user.set_role" in page


def test_admin_promotes_and_rolls_back_from_the_models_page(app, client):
    from sqlalchemy import select

    from webapp.extensions import db
    from webapp.models import AuditEvent, ModelVersion

    add_user(app, "boss@example.org", "admin")
    add_user(app, "rev@example.org", "reviewer")
    model_version(app, "v1")
    model_version(app, "v2", active=False)

    def active():
        with app.app_context():
            return db.session.scalar(select(ModelVersion.name).where(ModelVersion.is_active.is_(True)))

    login(client, "rev@example.org")
    assert client.post("/admin/models/v2/promote").status_code == 403
    assert active() == "v1"
    client.post("/logout")

    login(client, "boss@example.org")
    page = client.get("/admin/models").data.decode()
    assert 'action="/admin/models/v2/promote"' in page and 'action="/admin/models/v1/promote"' not in page
    response = client.post("/admin/models/v2/promote", follow_redirects=True)
    assert response.status_code == 200 and b"v2 is now the active model" in response.data
    assert active() == "v2"
    assert b"already the active model" in client.post("/admin/models/v2/promote", follow_redirects=True).data
    assert client.post("/admin/models/v9/promote").status_code == 404
    response = client.post("/admin/models/rollback", follow_redirects=True)
    assert b"Rolled back: v1 is the active model again" in response.data and active() == "v1"
    with app.app_context():
        events = db.session.scalars(select(AuditEvent).where(AuditEvent.action.in_(
            ("model.promote", "model.rollback"))).order_by(AuditEvent.id)).all()
        assert [(e.action, e.actor.email) for e in events] == [("model.promote", "boss@example.org"),
                                                               ("model.rollback", "boss@example.org")]


def test_rollback_without_an_earlier_version_changes_nothing(app, client):
    add_user(app, "boss@example.org", "admin")
    model_version(app, "only")
    login(client, "boss@example.org")
    response = client.post("/admin/models/rollback", follow_redirects=True)
    assert b"Nothing changed: only has no earlier active version" in response.data


def test_promote_needs_the_csrf_token(make_app):
    app = make_app(WTF_CSRF_ENABLED=True)
    add_user(app, "boss@example.org", "admin")
    model_version(app, "v1")
    model_version(app, "v2", active=False)
    client = app.test_client()
    from tests.appfixtures import csrf_token

    token = csrf_token(client.get("/login").data)
    client.post("/login", data={"email": "boss@example.org", "password": "quiet-harbour-lamp", "csrf_token": token})
    assert client.post("/admin/models/v2/promote").status_code == 400
