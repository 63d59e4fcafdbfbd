"""Agreement statistics against values worked out by hand, and the admin page that shows them."""
from __future__ import annotations

import pytest

from tests.appfixtures import add_user, login
from tests.webapp.reviewdata import finished_case, model_version, review
from webapp.review_stats import ReviewRow, cohens_kappa, consensus, summarise_reviews

C, N = "cancer", "normal"

# Five cases, three reviewers. Case: model label, then (reviewer, label, seconds).
CASES = {
    1: (C, [("a", C, 10), ("b", C, None), ("c", N, 40)]),  # majority cancer
    2: (C, [("a", N, 20), ("b", N, None)]),                # reviewers correct the model: normal
    3: (N, [("a", N, 30), ("b", C, None)]),                # tie: no consensus
    4: (N, [("a", N, None), ("c", N, 60)]),                # confirmed normal
    5: (C, [("b", C, None)]),                              # one review, confirmed cancer
}
ROWS = [ReviewRow(case, who, model, label, secs) for case, (model, votes) in CASES.items() for who, label, secs in votes]


def test_cohens_kappa_textbook_and_edge_cases():
    # 50 items: both yes 20, A yes/B no 5, A no/B yes 10, both no 15.
    # p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5 = 0.4
    a = [C] * 25 + [N] * 25
    b = [C] * 20 + [N] * 5 + [C] * 10 + [N] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.4)
    assert cohens_kappa([C, N, C], [C, N, C]) == pytest.approx(1.0)
    assert cohens_kappa([C, N], [N, C]) == pytest.approx(-1.0)
    assert cohens_kappa([C, C], [C, C]) is None  # p_e = 1: undefined
    assert cohens_kappa([], []) is None
    with pytest.raises(ValueError):
        cohens_kappa([C], [C, N])


def test_consensus_rules():
    assert consensus([C, C, N]) == C
    assert consensus([C, N]) is None
    assert consensus([]) is None
    assert consensus([N, N], "unanimous") == N
    assert consensus([C, C, N], "unanimous") is None
    with pytest.raises(ValueError):
        consensus([C], "loudest")


def test_agreement_per_reviewer_and_overall_by_hand():
    s = summarise_reviews(ROWS)
    a, b, c = s.reviewers
    # a: model c,c,n,n vs a c,n,n,n: agree 3/4; p_o 3/4, p_e (2*1+2*3)/16 = 1/2 -> kappa 1/2
    assert (a.reviewer, a.n_reviews, a.n_agree, a.agreement) == ("a", 4, 3, 0.75)
    assert a.kappa_with_model == pytest.approx(0.5)
    assert a.mean_reading_seconds == pytest.approx(20.0)  # (10 + 20 + 30) / 3; not measured left out
    # b: model c,c,n,c vs b c,n,c,c: p_o 1/2, p_e (3*3+1*1)/16 = 5/8 -> kappa -1/3
    assert (b.n_reviews, b.n_agree, b.agreement) == (4, 2, 0.5)
    assert b.kappa_with_model == pytest.approx(-1 / 3)
    assert b.mean_reading_seconds is None
    # c: model c,n vs c n,n: p_o 1/2, p_e (0 + 1*2)/4 = 1/2 -> kappa 0
    assert (c.n_agree, c.agreement, c.kappa_with_model, c.mean_reading_seconds) == (1, 0.5, pytest.approx(0.0), 50.0)
    # overall: 6 of 10 agree; model 6c/4n, reviewers 4c/6n: p_e = (24+24)/100 -> (0.6-0.48)/0.52
    o = s.overall
    assert (o.n_reviews, o.n_agree, o.agreement) == (10, 6, 0.6)
    assert o.kappa_with_model == pytest.approx(0.12 / 0.52)
    assert o.mean_reading_seconds == pytest.approx(32.0)  # (10+20+30+40+60)/5


def test_consensus_confusion_and_between_reviewer_kappa_by_hand():
    s = summarise_reviews(ROWS)
    assert s.n_cases == 5 and s.n_ties == 1
    assert s.confusion == {C: {C: 2, N: 1}, N: {C: 0, N: 1}}
    # a-b on cases 1,2,3: a c,n,n / b c,n,c: p_o 2/3, p_e 4/9 -> 0.4
    # a-c on cases 1,4: a c,n / c n,n: p_o 1/2, p_e 1/2 -> 0;  b-c on case 1: c vs n -> 0
    assert [(x, y, n) for x, y, n, _ in s.reviewer_pairs] == [("a", "b", 3), ("a", "c", 2), ("b", "c", 1)]
    assert [k for *_, k in s.reviewer_pairs] == [pytest.approx(0.4), pytest.approx(0.0), pytest.approx(0.0)]
    assert s.kappa_between_reviewers == pytest.approx(0.4 / 3)


def test_active_model_sensitivity_and_specificity_against_consensus():
    # consensus: 1 cancer, 2 normal, 4 normal, 5 cancer (3 is a tie, left out)
    active = {1: C, 2: C, 3: N, 4: C, 5: N}
    s = summarise_reviews(ROWS, active, "m2")
    assert s.active_confusion == {"tp": 1, "fn": 1, "tn": 0, "fp": 2}
    assert (s.active_n, s.active_sensitivity, s.active_specificity) == (4, 0.5, 0.0)
    only_cancer = summarise_reviews(ROWS, {1: C, 5: C}, "m2")
    assert only_cancer.active_sensitivity == 1.0 and only_cancer.active_specificity is None


def test_statistics_page_shows_the_database_figures(app, client):
    add_user(app, "doc@example.org")
    for who in "abc":
        add_user(app, f"{who}@example.org", "reviewer")
    add_user(app, "boss@example.org", "admin")
    version = model_version(app, "m1")
    for case_no, (model, votes) in CASES.items():
        case_id = finished_case(app, version, 0.8 if model == C else 0.2, seed=case_no)
        assert case_id == case_no
        for who, label, secs in votes:
            verdict = "agree" if label == model else "disagree"
            review(app, case_id, f"{who}@example.org", verdict, None if verdict == "agree" else label,
                   seconds_ago=secs or 30)
    login(client, "boss@example.org")
    response = client.get("/admin/review-statistics")
    assert response.status_code == 200
    page = response.data.decode()
    assert "a@example.org" in page and "75.0 %" in page and "0.500" in page and "-0.333" in page
    assert 'id="kappa-between">0.133<' in page
    assert "1 without a majority" in page
    # the active model (m1) read every case: consensus cancer on 1, 5 and normal on 2, 4
    assert 'id="active-sensitivity">100.0 %<' in page and 'id="active-specificity">50.0 %<' in page


def test_class_agreement_counts_only_reviews_where_both_gave_a_class():
    from webapp.review_stats import ReviewRow, summarise_reviews

    rows = [ReviewRow(1, "a", "normal", "normal", 10.0, "benign", "benign"),
            ReviewRow(2, "a", "normal", "normal", 10.0, "normal", "benign"),   # verdicts agree, classes not
            ReviewRow(3, "a", "cancer", "cancer", 10.0, "malignant", "malignant"),
            ReviewRow(4, "a", "cancer", "cancer", 10.0, None, "malignant"),     # a two-class model: no class
            ReviewRow(5, "a", "normal", "normal", 10.0, "normal", None)]        # the reviewer named no class
    overall = summarise_reviews(rows).overall
    assert (overall.n_reviews, overall.agreement) == (5, 1.0)
    assert overall.class_n == 3 and overall.class_agreement == pytest.approx(2 / 3)
    # kappa by hand: observed 2/3; model classes b,n,m and reviewer b,b,m -> expected (1*2 + 1*1) / 9
    assert overall.class_kappa == pytest.approx((2 / 3 - 3 / 9) / (1 - 3 / 9))
