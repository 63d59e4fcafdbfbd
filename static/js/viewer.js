// Case-page image viewer: the image fitted to its panel, zoom (mouse wheel, buttons, + - 0)
// and pan (drag, arrow keys when zoomed in), the heatmap overlaid or side by side (S) and on
// or off (H), brightness and contrast on the image only (never the heatmap), full screen (F).
// Plain JavaScript, no library; sizes and positions are set through the CSSOM (allowed by
// the Content-Security-Policy, unlike style attributes). Keys never act while typing.
(function () {
  "use strict";
  var viewport = document.getElementById("viewport");
  var image = document.getElementById("case-image");
  if (!viewport || !image) { return; }
  var viewer = document.getElementById("viewer");
  var mainPane = document.getElementById("pane-main");
  var sidePane = document.getElementById("pane-side");
  var mainStack = document.getElementById("stack");
  var heatmap = document.getElementById("heatmap");
  var heatmapToggle = document.getElementById("heatmap-toggle");
  var zoomLevel = document.getElementById("zoom-level");
  var layoutButton = document.getElementById("layout-toggle");
  var fullscreenButton = document.getElementById("fullscreen-toggle");
  var brightness = document.getElementById("brightness");
  var contrast = document.getElementById("contrast");
  var MIN_ZOOM = 0.5, MAX_ZOOM = 32, STEP = 1.25, PAN_SHARE = 0.1;
  // zoom: times the fitted size (1 = fit); x, y: the image's top-left corner in the pane (px)
  var view = { zoom: 1, x: 0, y: 0, scale: 0 };
  var sideStack = null, sideImage = null, sideBySide = false;

  function natural() {
    return { w: image.naturalWidth || parseFloat(image.getAttribute("width")) || 1,
             h: image.naturalHeight || parseFloat(image.getAttribute("height")) || 1 };
  }
  function stacks() { return sideStack ? [mainStack, sideStack] : [mainStack]; }
  function panes() { return sideStack ? [mainPane, sidePane] : [mainPane]; }
  function fitScale() {
    var n = natural();
    return Math.min(mainPane.clientWidth / n.w, mainPane.clientHeight / n.h) || 1;
  }
  function clamp(value, low, high) { return Math.min(high, Math.max(low, value)); }

  function render() {
    var n = natural(), paneW = mainPane.clientWidth, paneH = mainPane.clientHeight;
    viewport.style.setProperty("--image-aspect", n.w + " / " + n.h);  // pane shape on narrow screens
    var scale = fitScale() * view.zoom, w = n.w * scale, h = n.h * scale;
    // Smaller than the pane: centred. Larger: panned at most to its edges, never into a gap.
    view.x = w <= paneW ? (paneW - w) / 2 : clamp(view.x, paneW - w, 0);
    view.y = h <= paneH ? (paneH - h) / 2 : clamp(view.y, paneH - h, 0);
    view.scale = scale;
    stacks().forEach(function (stack) {
      stack.style.width = w + "px";
      stack.style.height = h + "px";
      stack.style.transform = "translate(" + view.x + "px, " + view.y + "px)";
    });
    var larger = w > paneW + 0.5 || h > paneH + 0.5;
    panes().forEach(function (pane) { pane.classList.toggle("zoomed", larger); });
    if (zoomLevel) {
      zoomLevel.textContent = (view.zoom === 1 ? "fit " : "") + Math.round(scale * 100) + "%";
    }
  }

  function zoomTo(zoom, px, py) {
    zoom = clamp(zoom, MIN_ZOOM, MAX_ZOOM);
    if (px === undefined) { px = mainPane.clientWidth / 2; py = mainPane.clientHeight / 2; }
    var ratio = (fitScale() * zoom) / (view.scale || fitScale());
    // Keep the point under (px, py) where it is.
    view.x = px - (px - view.x) * ratio;
    view.y = py - (py - view.y) * ratio;
    view.zoom = zoom;
    render();
  }
  function fit() { view.zoom = 1; render(); }
  function pan(dx, dy) { view.x += dx; view.y += dy; render(); }
  function zoomedIn() { return mainPane.classList.contains("zoomed"); }

  function attach(pane) {
    pane.addEventListener("wheel", function (e) {
      e.preventDefault();
      var rect = pane.getBoundingClientRect();
      var step = e.deltaMode === 1 ? 0.05 : 0.002;  // lines or pixels
      zoomTo(view.zoom * Math.exp(-e.deltaY * step), e.clientX - rect.left, e.clientY - rect.top);
    }, { passive: false });
    pane.addEventListener("pointerdown", function (e) {
      if (e.button !== 0) { return; }
      var last = { x: e.clientX, y: e.clientY };
      pane.setPointerCapture(e.pointerId);
      pane.classList.add("dragging");
      function move(ev) { pan(ev.clientX - last.x, ev.clientY - last.y); last = { x: ev.clientX, y: ev.clientY }; }
      function up() {
        pane.classList.remove("dragging");
        pane.removeEventListener("pointermove", move);
        pane.removeEventListener("pointerup", up);
        pane.removeEventListener("pointercancel", up);
      }
      pane.addEventListener("pointermove", move);
      pane.addEventListener("pointerup", up);
      pane.addEventListener("pointercancel", up);
    });
    pane.addEventListener("dblclick", function (e) {
      var rect = pane.getBoundingClientRect();
      if (view.zoom === 1) { zoomTo(2, e.clientX - rect.left, e.clientY - rect.top); } else { fit(); }
    });
  }

  // Brightness and contrast: CSS filters on the image (both copies), never on the heatmap.
  function applyFilters() {
    var filter = "brightness(" + (brightness ? brightness.value / 100 : 1) + ") contrast(" +
                 (contrast ? contrast.value / 100 : 1) + ")";
    [image, sideImage].forEach(function (img) { if (img) { img.style.filter = filter; } });
  }

  function setSideBySide(on) {
    if (!heatmap || !sidePane) { return; }
    if (on && !sideStack) {
      sideStack = document.createElement("div");
      sideStack.className = "stack";
      sideImage = image.cloneNode(false);
      sideImage.removeAttribute("id");
      sideImage.alt = "The same image under the heatmap";
      sideStack.appendChild(sideImage);
      sidePane.appendChild(sideStack);
      sideImage.addEventListener("load", render);
      attach(sidePane);
    }
    sideBySide = on;
    // One heatmap element (its opacity and toggle stay as they are): over the image, or
    // over the copy in the second pane while the first shows the image alone.
    (on ? sideStack : mainStack).appendChild(heatmap);
    sidePane.hidden = !on;
    viewport.classList.toggle("side-by-side", on);
    if (layoutButton) {
      layoutButton.setAttribute("aria-pressed", on ? "true" : "false");
      layoutButton.textContent = on ? "Overlay" : "Side by side";
    }
    applyFilters();
    render();
  }

  function toggleFullscreen() {
    if (document.fullscreenElement) {
      document.exitFullscreen();
    } else if (viewer && viewer.requestFullscreen) {
      viewer.requestFullscreen().catch(function () { /* refused (e.g. not from a user gesture) */ });
    }
  }

  // ------------------------------------------------------------------ wiring
  viewport.classList.add("ready");
  attach(mainPane);
  if (image.complete) { render(); } else { image.addEventListener("load", render); }
  if (window.ResizeObserver) {
    new window.ResizeObserver(function () { render(); }).observe(mainPane);
  } else {
    window.addEventListener("resize", render);
  }

  function on(id, handler) {
    var el = document.getElementById(id);
    if (el) { el.addEventListener("click", handler); }
  }
  on("zoom-in", function () { zoomTo(view.zoom * STEP); });
  on("zoom-out", function () { zoomTo(view.zoom / STEP); });
  on("zoom-fit", fit);
  on("layout-toggle", function () { setSideBySide(!sideBySide); });
  on("adjust-reset", function () {
    if (brightness) { brightness.value = 100; }
    if (contrast) { contrast.value = 100; }
    applyFilters();
  });
  [brightness, contrast].forEach(function (slider) { if (slider) { slider.addEventListener("input", applyFilters); } });
  if (fullscreenButton) {
    if (!(viewer && viewer.requestFullscreen)) {
      fullscreenButton.hidden = true;  // e.g. iPhone Safari: no Fullscreen API for elements
    } else {
      fullscreenButton.addEventListener("click", toggleFullscreen);
      document.addEventListener("fullscreenchange", function () {
        var full = document.fullscreenElement === viewer;
        fullscreenButton.textContent = full ? "Leave full screen" : "Full screen";
        fullscreenButton.setAttribute("aria-pressed", full ? "true" : "false");
        render();
      });
    }
  }

  function isTextField(el) {
    if (!el || !el.tagName) { return false; }
    if (el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT") { return true; }
    return el.tagName === "INPUT" && !/^(radio|checkbox|button|submit|reset|range|color|file|image)$/.test(el.type);
  }
  function isControl(el) {  // arrow keys belong to radios, sliders and lists
    return !!el && /^(INPUT|SELECT|TEXTAREA)$/.test(el.tagName || "");
  }
  var ARROWS = { ArrowLeft: [1, 0], ArrowRight: [-1, 0], ArrowUp: [0, 1], ArrowDown: [0, -1] };

  document.addEventListener("keydown", function (e) {
    if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey || isTextField(e.target)) { return; }
    var key = e.key;
    if (key === "+" || key === "=") {
      zoomTo(view.zoom * STEP);
    } else if (key === "-" || key === "_") {
      zoomTo(view.zoom / STEP);
    } else if (key === "0") {
      fit();
    } else if ((key === "h" || key === "H") && heatmapToggle) {
      heatmapToggle.click();
    } else if ((key === "s" || key === "S") && layoutButton) {
      setSideBySide(!sideBySide);
    } else if ((key === "f" || key === "F") && fullscreenButton && !fullscreenButton.hidden) {
      toggleFullscreen();
    } else if (ARROWS[key] && zoomedIn() && !isControl(e.target)) {
      pan(ARROWS[key][0] * mainPane.clientWidth * PAN_SHARE, ARROWS[key][1] * mainPane.clientHeight * PAN_SHARE);
    } else {
      return;
    }
    e.preventDefault();
  });
})();
