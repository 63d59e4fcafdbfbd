"""Issue 11, lists in a real Chromium against `manage.py run` (web + worker + broker):
the case list changes status without a reload, nothing overflows sideways on a 390 px
phone (case list and case page), and the audit log fits a 1366 px window."""
from __future__ import annotations

import time

from tests.appfixtures import image_bytes
from tests.e2e.conftest import BROWSER_MARKS, sign_in

pytestmark = BROWSER_MARKS

OVERFLOW = "return [document.documentElement.scrollWidth, window.innerWidth]"


def _phone(make_browser, width: int = 390, height: int = 844):
    """A Chromium that lays pages out as a 390 x 844 phone. A desktop window cannot be
    narrower than 500 px, so the phone is emulated (as DevTools' device mode does): a
    mobile viewport that honours <meta name=viewport> and zooms out, widening
    window.innerWidth, when a page is wider than the screen."""
    driver = make_browser(500, height)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 3, "mobile": True})
    return driver


def _case(served, *, status: str = "queued", seed: int = 0, name: str | None = None, uploader: str = "doc@example.org",
          size=(200, 150)) -> int:
    """A case row with a stored image, written straight to the served app's database."""
    from webapp.accounts import find_user
    from webapp.extensions import db
    from webapp.models import Case, utcnow

    app = served.app
    with app.app_context():
        key, digest = app.extensions["file_store"].put(image_bytes(size=size, seed=seed), "images", ".png")
        done = status == "done"
        case = Case(uploader_id=find_user(uploader).id, status=status, image_sha256=digest, image_key=key,
                    image_format="PNG", original_filename=name or f"list-{seed}.png", width=size[0], height=size[1],
                    dispatched_at=utcnow(), label="cancer" if done else None, probability=0.73 if done else None)
        db.session.add(case)
        db.session.commit()
        case_id = case.id
        db.engine.dispose()
    return case_id


def _send_job(served, case_id: int) -> None:
    """Hand the case's job to the served app's broker, as an upload does."""
    from webapp import create_app
    from webapp.background import enqueue_prediction

    sender = create_app({"INSTANCE_PATH": str(served.instance), "CELERY_BROKER_URL": "embedded"})
    with sender.app_context():
        enqueue_prediction(sender, case_id)
        from webapp.extensions import db

        db.engine.dispose()
    sender.extensions["celery"].close()


def _status(served, case_id: int) -> str:
    from webapp.extensions import db
    from webapp.models import Case

    with served.app.app_context():
        status = db.session.get(Case, case_id).status
        db.session.remove()
        return status


def test_a_queued_case_turns_done_on_the_list_without_a_reload(served_app, make_browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    served = served_app
    case_id = _case(served, seed=21)
    driver = make_browser(1366, 900)
    sign_in(driver, served.base, "doc@example.org")
    driver.get(served.base + "/cases")
    row = f'tr[data-case-id="{case_id}"]'
    assert driver.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "queued"
    assert driver.find_element(By.CSS_SELECTOR, row + ' [data-field="status"]').text == "queued"
    thumb = driver.find_element(By.CSS_SELECTOR, row + " td.thumb img")
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth", thumb) == 96)
    driver.execute_script("window.__sameDocument = true;")  # gone if the page reloads

    _send_job(served, case_id)
    WebDriverWait(driver, 90).until(
        lambda d: d.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "done")
    assert driver.execute_script("return window.__sameDocument === true")
    assert driver.find_element(By.CSS_SELECTOR, row + ' [data-field="status"]').text == "done"
    said = driver.find_element(By.CSS_SELECTOR, row + ' [data-field="label"]').text
    assert said in ("Suspicious for malignancy", "Not suspicious")
    assert driver.find_element(By.CSS_SELECTOR, row + ' [data-field="probability"]').text.endswith("%")
    assert driver.find_element(By.ID, "case-list-live").get_attribute("textContent") == f"Case {case_id} is done."


def test_no_sideways_overflow_at_390_px_on_the_list_and_the_case_page(served_app, make_browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    served = served_app
    long_name = "ultrasound-left-breast-upper-outer-quadrant-" + "x" * 60 + ".png"
    for seed in range(3):
        _case(served, status="done", seed=40 + seed, name=long_name)
    image = served.tmp_path / "phone.png"
    image.write_bytes(image_bytes(size=(640, 480), seed=44))

    phone = _phone(make_browser)
    sign_in(phone, served.base, "doc@example.org")
    phone.get(served.base + "/cases/upload")
    phone.find_element(By.NAME, "images").send_keys(str(image))
    phone.find_element(By.CSS_SELECTOR, "input[type=submit][value=Upload]").click()
    WebDriverWait(phone, 30).until(lambda d: "/cases/" in d.current_url and "upload" not in d.current_url)
    case_id = int(phone.current_url.rstrip("/").split("/")[-1].split("?")[0])
    deadline = time.monotonic() + 90
    while _status(served, case_id) not in ("done", "failed") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _status(served, case_id) == "done"

    for who in ("doc@example.org", "admin@example.org"):  # the admin's list has the uploader column too
        if who != "doc@example.org":
            phone.delete_all_cookies()
            sign_in(phone, served.base, who)
        for path in ("/cases", f"/cases/{case_id}"):
            phone.get(served.base + path)
            WebDriverWait(phone, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")
            width, inner = phone.execute_script(OVERFLOW)
            assert inner <= 400, f"the window is not phone-sized: {inner} px"
            assert width <= inner, f"{who} {path}: page is {width} px wide in a {inner} px window"
        # On the phone the list is cards: one per case, the file name wrapped inside it.
        phone.get(served.base + "/cases")
        rows = phone.find_elements(By.CSS_SELECTOR, "table.case-list tbody tr")
        assert len(rows) == 4 and all(r.value_of_css_property("display") == "grid" for r in rows)
        assert all(r.rect["width"] <= 390 for r in rows)


def test_the_audit_log_fits_1366_px(served_app, make_browser):
    from webapp.extensions import db
    from webapp.models import AuditEvent

    served = served_app
    with served.app.app_context():
        for i in range(30):
            db.session.add(AuditEvent(action="case.upload", target_type="case", target_id=i + 1,
                                      details={"filename": "a-very-long-file-name-" + "y" * 120 + ".png",
                                               "sha256": "f" * 64, "note": "word " * 40, "i": i}))
        db.session.commit()
        db.engine.dispose()
    driver = make_browser(1366, 900)
    sign_in(driver, served.base, "admin@example.org")
    for path in ("/admin/audit", "/admin/review-statistics", "/admin/models"):
        driver.get(served.base + path)
        width, inner = driver.execute_script(OVERFLOW)
        assert width <= inner, f"{path}: page is {width} px wide in a {inner} px window"
