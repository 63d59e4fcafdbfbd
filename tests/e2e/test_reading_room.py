"""Issue 11, the reading room in a real Chromium on the real app (`manage.py run`):
a keyboard-only review of three cases from the queue, other readers' reviews hidden until
one's own is saved, the viewer's zoom and pan, side by side, brightness, the dark theme,
and the layout at 1366 and 390 px. Finished cases are written straight to the served
app's database (the worker that normally writes them is tested elsewhere)."""
from __future__ import annotations

import io
import re

from tests.appfixtures import image_bytes
from tests.e2e.conftest import BROWSER_MARKS, sign_in

pytestmark = BROWSER_MARKS


def _heatmap_png(size=(160, 120)) -> bytes:
    from PIL import Image

    heat = Image.new("RGBA", size, (0, 0, 0, 0))
    heat.paste((253, 231, 37, 230), (40, 30, 100, 80))
    buffer = io.BytesIO()
    heat.save(buffer, "PNG")
    return buffer.getvalue()


def done_case(served, probability: float, seed: int, heatmap: bool = False, threshold: float = 0.5) -> int:
    """A finished case on the served app's active model, uploaded by doc@example.org."""
    from sqlalchemy import select

    from webapp.accounts import find_user
    from webapp.extensions import db
    from webapp.models import Case, ModelVersion, Prediction

    app = served.app
    with app.app_context():
        store = app.extensions["file_store"]
        key, digest = store.put(image_bytes(size=(160, 120), seed=seed), "images", ".png")
        heatmap_key = store.put(_heatmap_png(), "heatmaps", ".png")[0] if heatmap else None
        version = db.session.scalar(select(ModelVersion).where(ModelVersion.is_active))
        label = "cancer" if probability >= threshold else "normal"
        case = Case(uploader_id=find_user("doc@example.org").id, status="done", image_sha256=digest, image_key=key,
                    image_format="PNG", original_filename=f"scan-{seed}.png", width=160, height=120,
                    label=label, probability=probability)
        db.session.add(case)
        db.session.flush()
        db.session.add(Prediction(case_id=case.id, model_version_id=version.id, probability=probability,
                                  label=label, threshold=threshold, method="gradcam", timings={},
                                  heatmap_key=heatmap_key))
        db.session.commit()
        case_id = case.id
        db.engine.dispose()  # no connection kept open on the server's SQLite file
        return case_id


def _reviews(served, email: str) -> dict[int, tuple]:
    from sqlalchemy import select

    from webapp.accounts import find_user
    from webapp.extensions import db
    from webapp.models import Review

    with served.app.app_context():
        rows = db.session.scalars(select(Review).where(Review.reviewer_id == find_user(email).id)).all()
        found = {r.case_id: (r.verdict, r.detailed_label or r.label, r.confidence, r.comment) for r in rows}
        db.engine.dispose()
        return found


def _keys(driver, *keys) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(driver)
    for key in keys:
        chain.send_keys(key)
    chain.perform()


def _ctrl_enter(driver) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()


def _case_id(url: str) -> int | None:
    match = re.search(r"/cases/(\d+)\?queue=", url)
    return int(match.group(1)) if match else None


def test_a_keyboard_only_review_of_three_cases_from_the_queue(served_app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    served = served_app
    # |p - 0.5|: 0.4, 0.3, 0.1: the queue ("most uncertain first") opens with `third`.
    first, second, third = done_case(served, 0.9, 1), done_case(served, 0.2, 2), done_case(served, 0.6, 3)
    # What the reader answers on each case, in keys: label, verdict, confidence.
    answers = {first: ("3", "a", "c"), second: ("3", "d", "p"), third: ("1", "d", "u")}
    expected = {first: ("agree", "malignant", "certain", None), second: ("disagree", "malignant", "probable", "and 2 notes"),
                third: ("disagree", "normal", "unsure", None)}
    wait = WebDriverWait(browser, 30)
    sign_in(browser, served.base, "rev1@example.org")
    browser.get(served.base + "/reviews")
    assert "3 of 3 left" in browser.find_element(By.ID, "queue-progress").text

    # From the queue, by keyboard: Tab to "Start reading", Enter.
    for _ in range(40):
        if browser.switch_to.active_element.get_attribute("id") == "start-reading":
            break
        _keys(browser, Keys.TAB)
    else:
        raise AssertionError("Tab never reached the Start reading link")
    _keys(browser, Keys.ENTER)

    visited = []
    while len(visited) < 3:
        wait.until(lambda d: _case_id(d.current_url) not in (None, *visited))
        case_id = _case_id(browser.current_url)
        visited.append(case_id)
        wait.until(lambda d: d.find_elements(By.ID, "review-form"))
        left = browser.find_element(By.ID, "queue-progress").text
        assert f"{4 - len(visited)} of 3 left" in left
        shortcuts = browser.find_element(By.ID, "shortcuts")
        assert "Save & next" in shortcuts.get_attribute("textContent")
        _keys(browser, *answers[case_id])
        if case_id == second:
            # Typing in the comment box is typing, not shortcuts: "a" does not agree,
            # "n" does not skip, "2" does not change the label.
            comment = browser.find_element(By.ID, "review-comment")
            comment.send_keys("and 2 notes")
            assert browser.find_element(By.CSS_SELECTOR, "input[name=verdict][value=disagree]").is_selected()
            assert browser.find_element(By.ID, "review-label").get_attribute("value") == "malignant"
            assert _case_id(browser.current_url) == case_id
            _ctrl_enter(browser)  # Ctrl+Enter does work from the comment box
        else:
            _keys(browser, Keys.ESCAPE, "?")
            assert shortcuts.get_attribute("open") is not None
            _keys(browser, "?")
            _ctrl_enter(browser)
        wait.until(lambda d, was=case_id: _case_id(d.current_url) != was)

    assert visited == [third, second, first]
    assert browser.current_url.endswith("/reviews?sort=uncertain")
    assert "Queue done" in browser.find_element(By.CSS_SELECTOR, ".flashes").text
    assert "0 of 3 left" in browser.find_element(By.ID, "queue-progress").text
    assert _reviews(served, "rev1@example.org") == expected


def test_other_readers_reviews_stay_hidden_until_ones_own_is_saved(served_app, make_browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    served = served_app
    case_id = done_case(served, 0.8, 7)
    first, second, admin = make_browser(1366, 900), make_browser(1366, 900), make_browser(1366, 900)

    sign_in(first, served.base, "rev1@example.org")
    first.get(f"{served.base}/cases/{case_id}")
    first.find_element(By.CSS_SELECTOR, "input[name=verdict][value=disagree]").click()
    first.find_element(By.CSS_SELECTOR, "#review-label option[value=benign]").click()
    first.find_element(By.CSS_SELECTOR, "input[name=confidence][value=certain]").click()
    first.find_element(By.ID, "review-comment").send_keys("rev1 thinks it is a cyst")
    first.find_element(By.ID, "save-review").click()
    WebDriverWait(first, 30).until(lambda d: "Your review (version 1)" in d.page_source)

    sign_in(second, served.base, "rev2@example.org")
    second.get(f"{served.base}/cases/{case_id}")
    review = second.find_element(By.ID, "review").text
    assert "rev1@example.org" not in second.page_source and "rev1 thinks it is a cyst" not in second.page_source
    assert "shown once your own review is saved" in review
    second.find_element(By.CSS_SELECTOR, "input[name=verdict][value=agree]").click()
    second.find_element(By.CSS_SELECTOR, "input[name=confidence][value=probable]").click()
    second.find_element(By.ID, "save-review").click()
    WebDriverWait(second, 30).until(lambda d: "Reviews of this case" in d.page_source)
    review = second.find_element(By.ID, "review").text
    assert "rev1@example.org" in review and "rev1 thinks it is a cyst" in review and "rev2@example.org" in review

    sign_in(admin, served.base, "admin@example.org")  # admins oversee: every review, none given
    admin.get(f"{served.base}/cases/{case_id}")
    review = admin.find_element(By.ID, "review").text
    assert "rev1 thinks it is a cyst" in review and "rev2@example.org" in review


def _rect(driver, element_id: str) -> dict:
    return driver.execute_script("var r = document.getElementById(arguments[0]).getBoundingClientRect();"
                                 "return {left: r.left, top: r.top, width: r.width, height: r.height,"
                                 "right: r.right, bottom: r.bottom};", element_id)


def test_the_viewer_zooms_pans_swaps_and_goes_dark(served_app, make_browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    served = served_app
    case_id = done_case(served, 0.7, 5, heatmap=True)
    browser = make_browser(1366, 900)
    # Every Content-Security-Policy violation on every page is recorded (none may happen).
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "window.cspViolations = []; document.addEventListener('securitypolicyviolation',"
        " function (e) { window.cspViolations.push(e.violatedDirective + ' ' + e.blockedURI); });")})
    sign_in(browser, served.base, "rev1@example.org")
    browser.get(f"{served.base}/cases/{case_id}")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.execute_script("return document.getElementById('case-image').naturalWidth") == 160)
    wait.until(lambda d: "fit" in d.find_element(By.ID, "zoom-level").text)

    # Fitted to its panel, not the native 160 px; the review form beside it.
    fitted, pane = _rect(browser, "case-image"), _rect(browser, "pane-main")
    assert fitted["width"] > 400 and (abs(fitted["width"] - pane["width"]) < 2 or abs(fitted["height"] - pane["height"]) < 2)
    assert _rect(browser, "review")["left"] >= _rect(browser, "viewer")["right"]
    assert _rect(browser, "heatmap")["width"] == fitted["width"]

    _keys(browser, "+")
    zoomed = _rect(browser, "case-image")["width"]
    assert zoomed > fitted["width"] * 1.2
    browser.find_element(By.ID, "zoom-in").click()
    assert _rect(browser, "case-image")["width"] > zoomed * 1.2
    assert _rect(browser, "heatmap")["width"] == _rect(browser, "case-image")["width"]
    # Pan: arrow keys and a drag move the zoomed image.
    before = _rect(browser, "case-image")["left"]
    _keys(browser, Keys.ARROW_RIGHT)
    assert _rect(browser, "case-image")["left"] < before - 10
    before = _rect(browser, "case-image")
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "pane-main")).click_and_hold() \
        .move_by_offset(60, 40).release().perform()
    after = _rect(browser, "case-image")
    assert after["left"] > before["left"] + 30 and after["top"] > before["top"] + 20
    _keys(browser, "0")
    assert abs(_rect(browser, "case-image")["width"] - fitted["width"]) < 1
    # The mouse wheel zooms the image, not the page.
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(browser.find_element(By.ID, "pane-main")),
                                             0, -300).perform()
    wait.until(lambda d: _rect(d, "case-image")["width"] > fitted["width"] * 1.3)
    assert browser.execute_script("return window.scrollY") == 0
    _keys(browser, "0")
    browser.find_element(By.ID, "zoom-out").click()
    assert _rect(browser, "case-image")["width"] < fitted["width"]
    browser.find_element(By.ID, "zoom-fit").click()
    assert abs(_rect(browser, "case-image")["width"] - fitted["width"]) < 1

    # Brightness and contrast change the image, never the heatmap.
    for slider, value in (("brightness", 150), ("contrast", 80)):
        browser.execute_script("var s = document.getElementById(arguments[0]); s.value = arguments[1];"
                               "s.dispatchEvent(new Event('input'))", slider, value)
    image, heatmap = browser.find_element(By.ID, "case-image"), browser.find_element(By.ID, "heatmap")
    assert image.value_of_css_property("filter") == "brightness(1.5) contrast(0.8)"
    assert heatmap.value_of_css_property("filter") == "none"

    # S: side by side (plain image | image under the heatmap); H: heatmap off and on.
    _keys(browser, "s")
    assert browser.find_element(By.ID, "pane-side").is_displayed()
    assert browser.execute_script("return document.getElementById('heatmap').closest('.pane').id") == "pane-side"
    wait.until(lambda d: _rect(d, "pane-side")["left"] >= _rect(d, "pane-main")["right"] - 1)
    _keys(browser, "h")
    assert not heatmap.is_displayed()
    _keys(browser, "h", "s")
    assert heatmap.is_displayed() and not browser.find_element(By.ID, "pane-side").is_displayed()
    assert browser.execute_script("return document.getElementById('heatmap').closest('.pane').id") == "pane-main"

    # F: the viewer fills the screen, the image fitted to it; F again leaves.
    _keys(browser, "f")
    wait.until(lambda d: d.execute_script("return document.fullscreenElement && document.fullscreenElement.id") == "viewer")
    screen_width = browser.execute_script("return document.getElementById('viewer').clientWidth")
    wait.until(lambda d: _rect(d, "pane-main")["width"] > screen_width * 0.9)
    _keys(browser, "f")
    wait.until(lambda d: d.execute_script("return document.fullscreenElement") is None)

    assert browser.execute_script("return window.cspViolations") == []

    # The dark reading-room theme: the whole page, remembered on the next page.
    light = browser.find_element(By.TAG_NAME, "body").value_of_css_property("background-color")
    browser.find_element(By.ID, "theme-toggle").click()
    dark = browser.find_element(By.TAG_NAME, "body").value_of_css_property("background-color")
    assert dark != light and "theme-dark" in browser.find_element(By.TAG_NAME, "html").get_attribute("class")
    browser.get(f"{served.base}/reviews")
    assert browser.find_element(By.TAG_NAME, "body").value_of_css_property("background-color") == dark
    browser.get(f"{served.base}/cases/{case_id}")
    assert browser.find_element(By.ID, "theme-toggle").get_attribute("aria-pressed") == "true"
    browser.find_element(By.ID, "theme-toggle").click()
    assert browser.find_element(By.TAG_NAME, "body").value_of_css_property("background-color") == light
    assert browser.execute_script("return window.cspViolations") == []

    # A phone: everything stacked, nothing wider than the screen, the image still fitted.
    phone = make_browser(390, 844)
    # Headless windows do not shrink below about 500 px: emulate the phone's screen itself.
    phone.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                          {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    sign_in(phone, served.base, "rev1@example.org")
    phone.get(f"{served.base}/cases/{case_id}")
    WebDriverWait(phone, 30).until(lambda d: "fit" in d.find_element(By.ID, "zoom-level").text)
    assert phone.execute_script("return window.innerWidth") == 390
    assert phone.execute_script("return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    assert _rect(phone, "review")["top"] >= _rect(phone, "viewer")["bottom"]
    assert _rect(phone, "case-image")["width"] > 300
    # The pane takes the image's proportions: no black bands above and below it.
    assert abs(_rect(phone, "pane-main")["height"] - _rect(phone, "case-image")["height"]) < 2


def test_a_blinded_reader_skips_then_reads_blind_by_keyboard(served_app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from webapp.accounts import find_user
    from webapp.extensions import db

    served = served_app
    skipped, read = done_case(served, 0.55, 11), done_case(served, 0.7, 12)  # queue order: skipped, read
    with served.app.app_context():
        find_user("rev2@example.org").blinded_review = True
        db.session.commit()
        db.engine.dispose()
    wait = WebDriverWait(browser, 30)
    sign_in(browser, served.base, "rev2@example.org")
    browser.get(f"{served.base}/cases/{skipped}?queue=uncertain")
    wait.until(lambda d: d.find_elements(By.ID, "blind-form"))
    assert "Model output" not in browser.page_source
    _keys(browser, "n")  # next without saving
    wait.until(lambda d: _case_id(d.current_url) == read)

    for case_id, blind, confirm in ((read, ("3", "c"), ("a", "c")), (skipped, ("1", "u"), ("d", "1", "p"))):
        wait.until(lambda d: d.find_elements(By.ID, "blind-form"))
        _keys(browser, *blind)
        _ctrl_enter(browser)  # saves the blind label; the model's output appears
        wait.until(lambda d: d.find_elements(By.ID, "review-form"))
        assert _case_id(browser.current_url) == case_id
        assert browser.find_element(By.ID, "result-h").text == "Model output"
        _keys(browser, *confirm)
        _ctrl_enter(browser)  # Save & next: after the last case the queue wraps to the skipped one
        wait.until(lambda d, was=case_id: _case_id(d.current_url) != was)

    assert browser.current_url.endswith("/reviews?sort=uncertain")
    assert "Queue done" in browser.find_element(By.CSS_SELECTOR, ".flashes").text
    assert _reviews(served, "rev2@example.org") == {read: ("agree", "cancer", "certain", None),
                                                    skipped: ("disagree", "normal", "probable", None)}
    with served.app.app_context():  # the blind labels are kept beside the final answers
        from sqlalchemy import select

        from webapp.models import Review
        blind = {r.case_id: r.blinded_label for r in db.session.scalars(select(Review))}
        db.engine.dispose()
    assert blind == {read: "cancer", skipped: "normal"}
