// Dark reading-room theme: a class on <html>, chosen with any [data-theme-toggle] button and
// remembered in localStorage. Loaded in <head> (not deferred) so a dark page never flashes light.
(function () {
  "use strict";
  var KEY = "breast-review.theme";
  var root = document.documentElement;

  function stored() {
    try { return window.localStorage.getItem(KEY); } catch (e) { return null; }  // storage blocked
  }
  function apply(dark) { root.classList.toggle("theme-dark", dark); }
  apply(stored() === "dark");

  document.addEventListener("DOMContentLoaded", function () {
    var buttons = document.querySelectorAll("[data-theme-toggle]");
    function sync() {
      var dark = root.classList.contains("theme-dark");
      Array.prototype.forEach.call(buttons, function (b) { b.setAttribute("aria-pressed", dark ? "true" : "false"); });
    }
    Array.prototype.forEach.call(buttons, function (button) {
      button.addEventListener("click", function () {
        var dark = !root.classList.contains("theme-dark");
        apply(dark);
        try { window.localStorage.setItem(KEY, dark ? "dark" : "light"); } catch (e) { /* not remembered */ }
        sync();
      });
    });
    sync();
  });
})();
