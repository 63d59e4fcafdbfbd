// Case page: heatmap opacity and toggle, and status polling while the job runs.
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
