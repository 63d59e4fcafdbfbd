// Case list: statuses, results and review counts of queued/running cases update without a
// reload, by polling one small JSON endpoint (GET /cases/status?ids=...) for the rows on
// this page that are still waiting. Polling stops once every row is finished.
(function () {
  "use strict";
  var table = document.getElementById("case-list");
  if (!table || !window.fetch) { return; }
  var url = table.dataset.statusUrl;
  var delay = Math.max(parseInt(table.dataset.pollMs, 10) || 1000, 500);
  var live = document.getElementById("case-list-live");
  var PENDING = { queued: true, running: true };

  function rows() { return Array.prototype.slice.call(table.querySelectorAll("tbody tr[data-case-id]")); }
  function pending() { return rows().filter(function (r) { return PENDING[r.dataset.status]; }); }
  function field(row, name) { return row.querySelector('[data-field="' + name + '"]'); }

  function setText(el, text, className) {
    if (!el) { return; }
    el.textContent = "";
    if (className) {
      var span = document.createElement("span");
      span.className = className;
      span.textContent = text;
      el.appendChild(span);
    } else {
      el.textContent = text;
    }
  }

  function update(row, data) {
    var badge = field(row, "status");
    if (badge && data.status !== row.dataset.status) {
      badge.textContent = data.status;
      badge.className = "status " + data.status;
      if (live) { live.textContent = "Case " + data.id + " is " + data.status + "."; }
    }
    row.dataset.status = data.status;
    if (data.finished) {
      var resend = row.querySelector("form.resend");
      if (resend) { resend.parentNode.removeChild(resend); }
    }
    if (!data.hidden) {
      setText(field(row, "label"), data.label_text, data.label ? "label " + data.label : null);
      setText(field(row, "probability"), data.probability_text, null);
    }
    var reviews = field(row, "reviews");
    if (reviews) {
      setText(reviews, data.review_text, data.consensus ? "label " + data.consensus : null);
      if (data.consensus_after_own) {
        var hint = document.createElement("span");
        hint.className = "hint";
        hint.textContent = " (consensus after your review)";
        reviews.appendChild(hint);
      }
    }
  }

  function poll() {
    var waiting = pending();
    if (!waiting.length) { return; }
    if (document.hidden) { setTimeout(poll, delay * 3); return; }  // a background tab asks less often
    var ids = waiting.map(function (r) { return r.dataset.caseId; }).join(",");
    fetch(url + "?ids=" + encodeURIComponent(ids), { headers: { "Accept": "application/json" }, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.json(); })
      .then(function (data) {
        var byId = {};
        data.cases.forEach(function (c) { byId[String(c.id)] = c; });
        waiting.forEach(function (row) {
          var c = byId[row.dataset.caseId];
          if (c) { update(row, c); } else { row.dataset.status = "gone"; }  // withdrawn meanwhile: stop asking
        });
        setTimeout(poll, delay);
      })
      .catch(function () { setTimeout(poll, delay * 3); });  // network blip: back off, keep trying
  }
  setTimeout(poll, delay);
})();
