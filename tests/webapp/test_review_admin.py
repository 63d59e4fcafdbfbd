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
                        "promotion": {"mode": "auto", "promote": False, "reasons": ["sensitivity below"]}}
        db.session.commit()
    login(client, "boss@example.org")
    assert b'href="/admin/models/v2"' in client.get("/admin/models").data
    page = client.get("/admin/models/v2").data.decode()
    assert "NOT for clinical use" in page and "Intended use" in page and "Limitations" in page
    assert "0.812 (95% CI 0.700–0.900)" in page and "0.750" in page and "n feedback" in page
    assert 'href="/admin/models/v1"' in page and "not promoted" in page
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
