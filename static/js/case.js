// Case page: heatmap opacity and toggle, review keyboard shortcuts, and status polling
// while the job runs (the image viewer is static/js/viewer.js).
(function () {
  "use strict";
  var heatmap = document.getElementById("heatmap");
  var slider = document.getElementById("heatmap-opacity");
  var toggle = document.getElementById("heatmap-toggle");
  var shown = document.getElementById("opacity-value");
  if (heatmap && slider) {
    slider.addEventListener("input", function () {
      heatmap.style.opacity = slider.value / 100;
      if (shown) { shown.textContent = slider.value + "%"; }
    });
  }
  if (heatmap && toggle) {
    toggle.addEventListener("change", function () { heatmap.classList.toggle("hidden", !toggle.checked); });
  }

  // Review shortcuts (listed on the page in #shortcuts): A/D verdict, 1/2/3 label, C/P/U
  // confidence, Ctrl+Enter save (Save & next), N next without saving, ? the list. Letters
  // and digits never act while the cursor is in a text field; Ctrl+Enter works there too.
  var panel = document.getElementById("review");
  var form = document.getElementById("review-form") || document.getElementById("blind-form");
  var shortcuts = document.getElementById("shortcuts");
  var LABELS = { "1": "normal", "2": "benign", "3": "malignant" };
  var CONFIDENCES = { c: "certain", p: "probable", u: "unsure" };

  function typing(el) {
    if (!el || !el.tagName) { return false; }
    if (el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT") { return true; }
    return el.tagName === "INPUT" && !/^(radio|checkbox|button|submit|reset|range|color|file|image)$/.test(el.type);
  }
  function choose(name, value) {
    var input = form && form.querySelector("input[type=radio][name=" + name + "][value=" + value + "]");
    if (!input) { return false; }
    input.checked = true;
    input.dispatchEvent(new Event("change", { bubbles: true }));
    return true;
  }
  function label(value) {
    var select = form && form.querySelector("select[name=label]");
    if (select) {
      select.value = value;
      select.dispatchEvent(new Event("change", { bubbles: true }));
      return true;
    }
    return choose("label", value);  // the blind read's radio buttons
  }
  function save() {
    var button = document.getElementById("save-next");
    if (form.requestSubmit) { form.requestSubmit(button || undefined); } else if (button) { button.click(); }
  }
  function toggleShortcuts() {
    if (!shortcuts) { return false; }
    shortcuts.open = !shortcuts.open;
    if (shortcuts.open) { shortcuts.scrollIntoView({ block: "nearest" }); }
    return true;
  }

  document.addEventListener("keydown", function (e) {
    if (e.defaultPrevented) { return; }
    if (form && e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      save();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey || typing(e.target)) { return; }
    var key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    var done = false;
    if (key === "?") {
      done = toggleShortcuts();
    } else if (key === "Escape" && shortcuts && shortcuts.open) {
      shortcuts.open = false;
      done = true;
    } else if (form && (key === "a" || key === "d")) {
      done = choose("verdict", key === "a" ? "agree" : "disagree");
    } else if (form && LABELS[key]) {
      done = label(LABELS[key]);
    } else if (form && CONFIDENCES[key]) {
      done = choose("confidence", CONFIDENCES[key]);
    } else if (key === "n" && panel && panel.dataset.nextUrl) {
      window.location.assign(panel.dataset.nextUrl);
      done = true;
    }
    if (done) { e.preventDefault(); }
  });

  var badge = document.getElementById("case-status");
  if (!badge) { return; }
  var status = badge.dataset.status;
  if (status === "done" || status === "failed") { return; }
  var delay = parseInt(badge.dataset.pollMs, 10) || 1000;
  function poll() {
    fetch(badge.dataset.statusUrl, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (data) {
        if (data.finished) { window.location.reload(); return; }  // server renders the result
        if (data.status !== status) { status = data.status; badge.textContent = status; badge.className = "status " + status; }
        setTimeout(poll, delay);
      })
      .catch(function () { setTimeout(poll, delay * 3); });  // network blip: back off, keep trying
  }
  setTimeout(poll, delay);
})();
