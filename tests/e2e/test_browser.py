"""The whole product as a user meets it: `manage.py run` (web + worker + embedded broker)
driven by a real Chromium: sign in, upload, watch the page update, read the result.
Fixtures (served_app, browser, make_browser, sign_in) live in tests/e2e/conftest.py."""
from __future__ import annotations

from tests.appfixtures import image_bytes
from tests.e2e.conftest import BROWSER_MARKS

pytestmark = BROWSER_MARKS


def test_sign_in_upload_and_see_the_result(served_app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    base, tmp_path = served_app
    image = tmp_path / "scan.png"
    image.write_bytes(image_bytes(size=(160, 120), seed=11))
    wait = WebDriverWait(browser, 60)

    browser.get(base + "/cases")
    assert "/login" in browser.current_url
    browser.find_element(By.NAME, "email").send_keys("doc@example.org")
    browser.find_element(By.NAME, "password").send_keys("quiet-harbour-lamp")
    browser.find_element(By.CSS_SELECTOR, "form.card button, form.card input[type=submit]").click()
    wait.until(EC.url_to_be(base + "/cases"))

    browser.get(base + "/cases/upload")
    browser.find_element(By.NAME, "images").send_keys(str(image))
    browser.find_element(By.NAME, "note").send_keys("browser test")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit][value=Upload]").click()

    # The case page polls the status endpoint and shows the result when the worker is done.
    wait.until(EC.text_to_be_present_in_element((By.ID, "result-h"), "Model output"))
    assert browser.find_element(By.ID, "case-status").text == "done"
    assert "tiny-demo" in browser.page_source
    assert browser.find_element(By.ID, "probability").text.endswith("%")
    heatmap = browser.find_element(By.ID, "heatmap")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap) == 160)

    # The opacity slider and the toggle act on the heatmap layer.
    slider = browser.find_element(By.ID, "heatmap-opacity")
    browser.execute_script("arguments[0].value = 80; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert heatmap.value_of_css_property("opacity") == "0.8"
    browser.find_element(By.ID, "heatmap-toggle").click()
    assert not heatmap.is_displayed()

    browser.get(base + "/cases")
    assert "scan.png" in browser.page_source and "done" in browser.page_source
