"""Issue 11, lists: the live case list (status JSON, thumbnails, review column), the review
statistics (intervals, drill-down, per version, CSV), the model card and the audit log
(filters, pages, CSV, case views); through the test client on the real database."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from tests.webapp.reviewdata import add_people, finished_case, model_version, review, signed_in

DEMO = Path(__file__).resolve().parents[2] / "demo"
# The bundled checkpoint and the figures recorded for it: the card must find them by sha256.
DEMO_SHA256 = hashlib.sha256((DEMO / "model.pt").read_bytes()).hexdigest()
DEMO_TEST = json.loads((DEMO / "evaluations.json").read_text())[DEMO_SHA256][0]["metrics"]


@pytest.fixture
def people(app):
    return add_people(app)


_client = signed_in


def _queued_case(app, uploader="doc@example.org", seed=50) -> int:
    from tests.appfixtures import image_bytes
    from webapp.accounts import find_user
    from webapp.extensions import db
    from webapp.models import Case

    with app.app_context():
        key, digest = app.extensions["file_store"].put(image_bytes(size=(300, 200), seed=seed), "images", ".png")
        case = Case(uploader_id=find_user(uploader).id, status="queued", image_sha256=digest, image_key=key,
                    image_format="PNG", original_filename=f"q-{seed}.png", width=300, height=200)
        db.session.add(case)
        db.session.commit()
        return case.id


def _set(app, case_id, **values):
    from webapp.extensions import db
    from webapp.models import Case

    with app.app_context():
        case = db.session.get(Case, case_id)
        for key, value in values.items():
            setattr(case, key, value)
        db.session.commit()


# ------------------------------------------------------------------ status JSON

def test_status_json_for_a_page_of_cases_respects_visibility_withdrawal_and_blinding(people):
    app = people
    version = model_version(app)
    mine = finished_case(app, version, 0.8, seed=1)
    waiting = _queued_case(app)
    theirs = finished_case(app, version, 0.2, seed=2, uploader_email="doc2@example.org")
    gone = finished_case(app, version, 0.3, seed=3)
    _set(app, gone, withdrawn_at=_now())

    doc = _client(app, "doc@example.org")
    response = doc.get(f"/cases/status?ids={mine},{waiting},{theirs},{gone},999")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "no-store, private"
    cases = {c["id"]: c for c in response.get_json()["cases"]}
    assert set(cases) == {mine, waiting}  # not another clinician's, not withdrawn, not unknown
    assert cases[mine]["status"] == "done" and cases[mine]["finished"] is True
    assert cases[mine]["label_text"] == "Suspicious for malignancy" and cases[mine]["probability_text"] == "80.0 %"
    assert cases[waiting]["status"] == "queued" and cases[waiting]["finished"] is False
    assert cases[waiting]["label"] is None and cases[waiting]["review_text"] == "not reviewed"

    # The worker finishes the job: the next poll says so.
    _set(app, waiting, status="done", label="normal", probability=0.1)
    again = {c["id"]: c for c in doc.get(f"/cases/status?ids={waiting}").get_json()["cases"]}
    assert again[waiting]["status"] == "done" and again[waiting]["label_text"] == "Not suspicious"

    rev = _client(app, "rev@example.org")
    assert {c["id"] for c in rev.get(f"/cases/status?ids={mine},{theirs},{gone}").get_json()["cases"]} == {mine, theirs}
    # A blinded reader gets no model output before their own label.
    from webapp.accounts import find_user
    from webapp.extensions import db

    with app.app_context():
        find_user("rev@example.org").blinded_review = True
        db.session.commit()
    blind = {c["id"]: c for c in rev.get(f"/cases/status?ids={mine}").get_json()["cases"]}
    assert blind[mine]["hidden"] is True and blind[mine]["label"] is None and blind[mine]["probability"] is None


@pytest.mark.parametrize("query,message", [("", b"ids=1,2,3"), ("ids=1,x", b"whole numbers"), ("ids=0", b"start at 1"),
                                           ("ids=" + ",".join(str(i) for i in range(1, 102)), b"at most 100")])
def test_status_json_refuses_bad_ids_with_a_message(people, query, message):
    response = _client(people, "doc@example.org").get(f"/cases/status?{query}")
    assert response.status_code == 400 and message in response.data


def test_the_list_page_polls_and_renders_the_rows_for_it(people):
    app = people
    waiting = _queued_case(app)
    page = _client(app, "doc@example.org").get("/cases").data.decode()
    assert 'data-status-url="/cases/status"' in page and "/static/js/case-list.js" in page
    assert f'<tr data-case-id="{waiting}" data-status="queued">' in page
    assert f'src="/cases/{waiting}/thumbnail"' in page
    assert "/static/css/case-list.css" in page and "<script>" not in page and 'style="' not in page


# ------------------------------------------------------------------ thumbnails

def test_thumbnail_is_a_small_cached_jpeg_only_for_those_who_may_see_the_case(people):
    app = people
    case_id = _queued_case(app)
    doc = _client(app, "doc@example.org")
    response = doc.get(f"/cases/{case_id}/thumbnail")
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert response.headers["Cache-Control"] == "no-store, private"
    image = Image.open(io.BytesIO(response.data))
    assert image.format == "JPEG" and max(image.size) <= 96 and image.size == (96, 64)  # 300 x 200 kept in shape
    store = app.extensions["file_store"]
    with app.app_context():
        from webapp.extensions import db
        from webapp.models import Case

        digest = db.session.get(Case, case_id).image_sha256
    cached = store.path(f"thumbs/{digest[:2]}/{digest}.jpg")
    assert cached.is_file() and cached.read_bytes() == response.data
    assert doc.get(f"/cases/{case_id}/thumbnail").data == response.data  # served from the cache
    # Another clinician: as if the case did not exist. A reviewer may see it.
    assert _client(app, "doc2@example.org").get(f"/cases/{case_id}/thumbnail").status_code == 404
    assert _client(app, "rev@example.org").get(f"/cases/{case_id}/thumbnail").status_code == 200
    assert doc.get("/cases/999/thumbnail").status_code == 404


def test_thumbnail_of_a_16_bit_image_uses_its_range_and_a_missing_image_is_404(people):
    import numpy as np

    app = people
    case_id = _queued_case(app)
    ramp = (np.arange(200 * 300).reshape(200, 300) % 300 * 100 + 30000).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    with app.app_context():
        key, digest = app.extensions["file_store"].put(buffer.getvalue(), "images", ".png")
    _set(app, case_id, image_key=key, image_sha256=digest)
    doc = _client(app, "doc@example.org")
    image = Image.open(io.BytesIO(doc.get(f"/cases/{case_id}/thumbnail").data)).convert("L")
    low, high = image.getextrema()
    assert low < 40 and high > 215  # stretched, not clipped to white
    _set(app, case_id, image_key="images/00/" + "0" * 64 + ".png", image_sha256="0" * 64)
    response = doc.get(f"/cases/{case_id}/thumbnail")
    assert response.status_code == 404 and b"no thumbnail" in response.data


# ------------------------------------------------------------------ review column

def test_review_column_shows_the_consensus_only_where_the_reader_may_see_it(people):
    app = people
    version = model_version(app)
    case_id = finished_case(app, version, 0.8)
    review(app, case_id, "rev@example.org", "disagree", "benign")

    def cell(email):
        page = _client(app, email).get("/cases").data.decode()
        row = re.search(rf'<tr data-case-id="{case_id}".*?</tr>', page, re.S).group(0)
        return re.sub(r"\s+", " ", re.search(r'data-field="reviews">(.*?)</td>', row, re.S).group(1))

    # The second reviewer has not read it: the count, not the verdict (independent reads).
    assert "1 review" in cell("rev2@example.org") and "Not suspicious" not in cell("rev2@example.org")
    assert "consensus after your review" in cell("rev2@example.org")
    status = _client(app, "rev2@example.org").get(f"/cases/status?ids={case_id}").get_json()["cases"][0]
    assert status["consensus"] is None and status["review_text"] == "1 review"
    # The reviewer who read it, and the admin, see the consensus; the clinician the count.
    assert "1 review: Not suspicious" in cell("rev@example.org")
    assert "1 review: Not suspicious" in cell("boss@example.org")
    assert "1 review" in cell("doc@example.org") and "Not suspicious" not in cell("doc@example.org")
    # After the second reviewer's own review: 1 against 1, no majority.
    review(app, case_id, "rev2@example.org", "agree")
    assert "2 reviews, no majority" in cell("rev2@example.org")
    # An admin who reads blinded waits for their own label, as on the case page.
    from webapp.accounts import find_user
    from webapp.extensions import db

    with app.app_context():
        find_user("boss@example.org").blinded_review = True
        db.session.commit()
    assert "2 reviews" in cell("boss@example.org") and "no majority" not in cell("boss@example.org")
    assert "consensus after your review" in cell("boss@example.org")


# ------------------------------------------------------------------ statistics arithmetic

def test_wilson_interval_against_a_hand_computation():
    from webapp.review_stats import wilson_interval

    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71673;
    # half-width 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 0.22658 -> 0.4902 to 0.9433
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # 0 of 10: 0 to z^2 / (n + z^2) = 3.8415 / 13.8415 = 0.2775
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) is None


def test_bootstrap_kappa_interval_is_reproducible_and_holds_the_estimate():
    from webapp.review_stats import bootstrap_kappa_interval, cohens_kappa

    a = ["cancer"] * 25 + ["normal"] * 25
    b = ["cancer"] * 20 + ["normal"] * 5 + ["cancer"] * 10 + ["normal"] * 15
    groups = [[(x, y)] for x, y in zip(a, b)]
    interval = bootstrap_kappa_interval(groups)
    assert interval == bootstrap_kappa_interval(groups)  # fixed seed
    low, high = interval
    assert cohens_kappa(a, b) == pytest.approx(0.4) and low < 0.4 < high
    assert 0.1 < low < 0.3 and 0.5 < high < 0.7  # analytic SE about 0.13 -> roughly 0.4 +- 0.25
    assert bootstrap_kappa_interval([[("cancer", "cancer")], [("normal", "normal")]] * 10) == (1.0, 1.0)
    assert bootstrap_kappa_interval([[("cancer", "cancer")]]) is None


# ------------------------------------------------------------------ statistics page and CSV

@pytest.fixture
def reviewed(people):
    """Two versions; m1 read cases 1-4, m2 (active) read cases 5-6; case 7 withdrawn."""
    app = people
    m1 = model_version(app, "m1", active=False)
    m2 = model_version(app, "m2", active=True)
    ids = [finished_case(app, m1, p, seed=i) for i, p in enumerate((0.9, 0.8, 0.2, 0.1), start=1)]
    ids += [finished_case(app, m2, p, seed=i) for i, p in enumerate((0.7, 0.3), start=5)]
    gone = finished_case(app, m2, 0.9, seed=7)
    # m1: case 1 cancer confirmed, case 2 cancer -> normal (false alarm), 3 normal confirmed,
    # case 4 normal -> cancer (missed); both reviewers agree with each other on all but case 3.
    for who in ("rev@example.org", "rev2@example.org"):
        review(app, ids[0], who, "agree")
        review(app, ids[1], who, "disagree", "normal")
        review(app, ids[3], who, "disagree", "cancer")
    review(app, ids[2], "rev@example.org", "agree")
    review(app, ids[2], "rev2@example.org", "disagree", "cancer")
    review(app, ids[4], "rev@example.org", "agree")
    review(app, ids[5], "rev@example.org", "agree")
    review(app, gone, "rev@example.org", "disagree", "normal")
    _set(app, gone, withdrawn_at=_now())
    return app, ids, gone


def test_statistics_page_has_intervals_warning_drill_down_and_versions(reviewed):
    app, ids, gone = reviewed
    boss = _client(app, "boss@example.org")
    page = boss.get("/admin/review-statistics").data.decode()
    # Withdrawn case 7 does not count: 6 cases, 10 reviews.
    assert "6 reviewed case(s)" in page and '<td>all reviewers</td><td>10</td>' in page
    assert f'href="/cases/{gone}"' not in page
    assert 'id="small-sample"' in page and "fewer than 30" in page
    assert "95 % CI" in page
    # Drill-down: model cancer / consensus normal is case 2; model normal / consensus cancer is case 4.
    cell = re.search(r'id="cell-cancer-normal">(.*?)</td>', page, re.S).group(1)
    assert f'href="/cases/{ids[1]}"' in cell and f'href="/cases/{ids[0]}"' not in cell
    cell = re.search(r'id="cell-normal-cancer">(.*?)</td>', page, re.S).group(1)
    assert f'href="/cases/{ids[3]}"' in cell
    pairs = re.search(r'id="pairs">(.*?)</table>', page, re.S).group(1)
    assert f'href="/cases/{ids[2]}"' in pairs  # the one case the two reviewers read differently
    # Per version: a table row each, and one version's own page.
    assert 'href="/admin/review-statistics?version=m1"' in page and "m2</a> (active)" in page
    m1 = boss.get("/admin/review-statistics?version=m1").data.decode()
    assert "4 reviewed case(s)" in m1 and '<td>all reviewers</td><td>8</td>' in m1
    # m1 against consensus: cancer on 1 and 4 (tie on 3 left out), normal on 2: tp 1, fn 1, fp 1, tn 0.
    assert 'id="active-sensitivity">50.0 %<' in m1 and 'id="active-specificity">0.0 %<' in m1
    assert boss.get("/admin/review-statistics?version=nope").status_code == 404


def test_statistics_csv_has_every_figure_and_is_for_admins_only(reviewed):
    app, ids, gone = reviewed
    assert _client(app, "rev@example.org").get("/admin/review-statistics.csv").status_code == 403
    response = _client(app, "boss@example.org").get("/admin/review-statistics.csv?version=m1")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(response.data.decode())))
    by = {(r["section"], r["model_version"], r["subject"]): r for r in rows}
    overall = by[("agreement_with_model", "m1", "all reviewers")]
    assert overall["n"] == "8" and overall["interval"] == "wilson"
    # 3 of 8 agree with the model (case 1 twice, case 3 once): Wilson 0.1368 to 0.6943
    assert float(overall["estimate"]) == pytest.approx(3 / 8)
    assert float(overall["ci_low"]) == pytest.approx(0.1368, abs=1e-3)
    assert float(overall["ci_high"]) == pytest.approx(0.6943, abs=1e-3)
    assert by[("sensitivity", "m1", "m1")]["cases"] == str(ids[3])  # the missed case
    assert by[("model_vs_consensus", "m1", "model cancer, consensus normal")]["cases"] == str(ids[1])
    assert by[("kappa_with_model", "m1", "all reviewers")]["interval"] == "bootstrap-cases"
    assert str(gone) not in {c for r in rows for c in r["cases"].split()}
    from webapp.extensions import db
    from webapp.models import AuditEvent

    with app.app_context():
        assert db.session.scalar(select(AuditEvent).where(AuditEvent.action == "review_statistics.export")) is not None


# ------------------------------------------------------------------ model card

def test_model_card_one_metric_a_row_integers_and_the_demo_models_test_figures(people):
    from webapp.extensions import db
    from webapp.models import ModelVersion

    app = people
    with app.app_context():
        db.session.add(ModelVersion(
            name="demo-2sites", file_key="models/aa/" + "a" * 64 + ".pt", checksum=DEMO_SHA256, threshold=0.183,
            input_size=128, is_active=True,
            metrics={"roc_auc": 0.8636, "sensitivity": 0.9057, "specificity": 0.6341, "n": 176.0, "n_positive": 53.0},
            meta={"training_sites": ["busi (Egypt, CC BY 4.0)"], "epoch": 32, "target_sensitivity": 0.9,
                  "data_fingerprint": {"n_files": 879, "n_positive": 266, "classes": ["benign", "malignant", "normal"]},
                  "calibration": {"method": "platt", "n": 176, "n_positive": 53}}))
        db.session.add(ModelVersion(name="site-tuned", file_key="models/dd/" + "d" * 64 + ".pt", checksum="d" * 64,
                                    threshold=0.2, input_size=32, metrics={"roc_auc": 0.8, "n": 40.0},
                                    meta={"calibration": {"method": "platt", "n": 60, "n_positive": 12},
                                          "site_adaptation": {"site": "Hospital B", "n": 60, "n_malignant": 12}}))
        db.session.add(ModelVersion(name="confident", file_key="models/cc/" + "c" * 64 + ".pt", checksum="c" * 64,
                                    threshold=0.1, input_size=32,
                                    metrics={"roc_auc": 0.8, "n": 40.0, "n_positive": 20.0, "target_confidence": 0.867},
                                    meta={"target_sensitivity": 0.9, "threshold_confidence": 0.8}))
        db.session.add(ModelVersion(name="by-hand", file_key="models/bb/" + "b" * 64 + ".pt", checksum="b" * 64,
                                    threshold=0.5, input_size=32, metrics={"roc_auc": 0.7, "n": 40.0}, meta={}))
        db.session.commit()
    boss = _client(app, "boss@example.org")
    page = boss.get("/admin/models/demo-2sites").data.decode()
    assert "BUS-UCLM" in page and "demo/evaluations.json" in page
    test = re.search(r'id="test-metrics">(.*?)</table>', page, re.S).group(1)
    lo, hi = DEMO_TEST["roc_auc_ci"]
    assert f'<th scope="row">ROC-AUC</th><td>{DEMO_TEST["roc_auc"]:.3f} (95% CI {lo:.3f}–{hi:.3f})</td>' in test
    assert '<th scope="row">Images</th><td>683</td>' in test and "683.000" not in page
    assert f'<th scope="row">False negatives</th><td>{DEMO_TEST["fn"]}</td>' in test
    validation = re.search(r'id="validation">(.*?)</table>', page, re.S).group(1)
    assert validation.count("<tr>") == 5 and '<th scope="row">Images</th><td>176</td>' in validation
    assert "validation split held out during training" in page and "176 images, 53 cancer" in page
    assert "threshold chosen on it for sensitivity 0.90, met on these images" in page
    assert "879" in page and "879.000" not in page and "No locked-test evaluation recorded" not in page
    assert "platt on 176 validation images (53 malignant, 30%) of its training data" in page
    assert "recalibrates on its reviewed cases" in page
    site_tuned = boss.get("/admin/models/site-tuned").data.decode()
    assert "platt on 60 reviewed cases of Hospital B (12 malignant, 20%)" in site_tuned
    assert "validation images" not in site_tuned
    confident = boss.get("/admin/models/confident").data.decode()
    assert "for sensitivity 0.90, kept on new cancers with probability 80%; 87% reached" in confident
    hand = boss.get("/admin/models/by-hand").data.decode()
    assert 'id="no-locked-test"' in hand and "No locked-test evaluation recorded" in hand
    assert '<th scope="row">Images</th><td>40</td>' in hand
    listing = boss.get("/admin/models").data.decode()
    assert f"{DEMO_TEST['roc_auc']:.3f}" in listing and "BUS-UCLM (Spain)" in listing and "no locked-test evaluation recorded" in listing
    assert "roc_auc=" not in listing and "/static/css/admin-tables.css" in listing


# ------------------------------------------------------------------ audit log

def _events(app, n, action="test.event", actor_email=None, days_ago=0, **details):
    from webapp.accounts import find_user
    from webapp.extensions import db
    from webapp.models import AuditEvent, utcnow

    with app.app_context():
        actor = find_user(actor_email) if actor_email else None
        when = utcnow() - timedelta(days=days_ago)
        db.session.add_all([AuditEvent(created_at=when, action=action, actor_id=actor.id if actor else None,
                                       details=dict(details, i=i)) for i in range(n)])
        db.session.commit()


def test_audit_log_filters_pages_beyond_200_and_rejects_bad_dates(people):
    app = people
    _events(app, 450, "bulk.event")
    _events(app, 3, "review.submit", "rev@example.org", days_ago=3)
    _events(app, 2, "review.revise", "rev2@example.org", days_ago=10)
    boss = _client(app, "boss@example.org")

    # Pages: 200, 200, then the rest, none twice.
    seen, url, pages = [], "/admin/audit?action=bulk.event", 0
    while url:
        page = boss.get(url).data.decode()
        pages += 1
        seen += [int(i) for i in re.findall(r'"i": (\d+)', page)]
        nxt = re.search(r'rel="next" href="([^"]+)"', page)
        url = nxt.group(1).replace("&amp;", "&") if nxt else None
    assert pages == 3 and len(seen) == 450 and len(set(seen)) == 450

    def actions(query):
        page = boss.get("/admin/audit?" + query).data.decode()
        return re.findall(r"<td>([a-z_]+\.[a-z_.]+)</td>", page)

    assert actions("actor=rev@example.org") == ["review.submit"] * 3
    assert actions("actor=REV2@example.org") == ["review.revise"] * 2
    assert sorted(set(actions("action=review."))) == ["review.revise", "review.submit"]
    from webapp.models import utcnow

    today = utcnow().date()
    assert set(actions(f"from={today - timedelta(days=5)}&to={today - timedelta(days=1)}")) == {"review.submit"}
    assert actions(f"to={today - timedelta(days=7)}") == ["review.revise"] * 2
    assert "bulk.event" not in actions("actor=system&action=review.")
    for query, message in (("from=yesterday", b"not a date"), ("to=2026-13-01", b"not a date"),
                           ("from=2026-02-01&to=2026-01-01", b"runs backwards"), ("case=abc", b"whole number"),
                           ("action=DROP%20TABLE", b"unknown action"), ("before=garbage", b"damaged")):
        response = boss.get("/admin/audit?" + query)
        assert response.status_code == 400 and message in response.data, query
    assert _client(app, "rev@example.org").get("/admin/audit").status_code == 403


def test_audit_csv_is_filtered_guarded_against_formulas_and_admin_only(people):
    app = people
    _events(app, 2, "review.submit", "rev@example.org")
    _events(app, 1, "bulk.event", os_user="=HYPERLINK(\"http://evil\")")
    _events(app, 1, "bulk.event", os_user="@SUM(1)")
    assert _client(app, "rev@example.org").get("/admin/audit.csv").status_code == 403
    boss = _client(app, "boss@example.org")
    response = boss.get("/admin/audit.csv?action=review.submit")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    rows = list(csv.reader(io.StringIO(response.data.decode())))
    assert rows[0] == ["id", "when_utc", "actor", "action", "target_type", "target_id", "details"]
    assert [r[3] for r in rows[1:]] == ["review.submit"] * 2 and {r[2] for r in rows[1:]} == {"rev@example.org"}
    rows = list(csv.reader(io.StringIO(boss.get("/admin/audit.csv?action=bulk.event").data.decode())))
    actors = sorted(r[2] for r in rows[1:])
    assert actors == ["'=HYPERLINK(\"http://evil\") (command line)", "'@SUM(1) (command line)"]
    assert boss.get("/admin/audit.csv?from=bad").status_code == 400
    from webapp.audit_log import csv_cell

    assert [csv_cell(v) for v in ("=1+2", "+1+cmd", "-1+2", "@A1", "\tx", "-2-3", "plain", None, 5)] == \
        ["'=1+2", "'+1+cmd", "'-1+2", "'@A1", "'\tx", "'-2-3", "plain", "", "5"]
    assert [csv_cell(v) for v in ("-0.25", -1, "+3", "1e-05")] == ["-0.25", "-1", "+3", "1e-05"]  # plain numbers


def test_case_views_are_recorded_once_per_user_and_case_per_window(people):
    from webapp.audit_log import CASE_VIEW_AUDIT_MINUTES
    from webapp.extensions import db
    from webapp.models import AuditEvent

    app = people
    case_id = finished_case(app, model_version(app), 0.7)
    doc, rev = _client(app, "doc@example.org"), _client(app, "rev@example.org")
    for _ in range(3):
        assert doc.get(f"/cases/{case_id}").status_code == 200
    rev.get(f"/cases/{case_id}")
    assert _client(app, "doc2@example.org").get(f"/cases/{case_id}").status_code == 404  # not seen: not recorded

    def views():
        with app.app_context():
            return [(e.actor.email, e.target_id) for e in db.session.scalars(
                select(AuditEvent).where(AuditEvent.action == "case.viewed").order_by(AuditEvent.id))]

    assert views() == [("doc@example.org", case_id), ("rev@example.org", case_id)]
    with app.app_context():  # the window passes
        for event in db.session.scalars(select(AuditEvent).where(AuditEvent.action == "case.viewed")):
            event.created_at -= timedelta(minutes=CASE_VIEW_AUDIT_MINUTES + 1)
        db.session.commit()
    doc.get(f"/cases/{case_id}")
    assert views()[-1] == ("doc@example.org", case_id) and len(views()) == 3
    page = _client(app, "boss@example.org").get(f"/admin/audit?action=case.viewed&case={case_id}").data.decode()
    assert page.count("<td>case.viewed</td>") == 3 and f'href="/cases/{case_id}">case {case_id}</a>' in page


def _now():
    from webapp.models import utcnow

    return utcnow()


def test_statistics_page_and_csv_with_no_reviews_yet(people):
    boss = _client(people, "boss@example.org")
    page = boss.get("/admin/review-statistics").data.decode()
    assert "0 reviewed case(s)" in page and 'id="small-sample"' in page and "No reviews yet." in page
    rows = list(csv.reader(io.StringIO(boss.get("/admin/review-statistics.csv").data.decode())))
    assert rows[0][:4] == ["section", "model_version", "subject", "n"] and len(rows) > 1
