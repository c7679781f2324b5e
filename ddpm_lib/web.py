"""Interactive figures for the static web book: plain HTML, JavaScript and SVG, no kernel, no CDN.

The web book is read where no Python runs, so ipywidgets sliders there render but do nothing. The
functions here return self-contained HTML (one ``<div>``, its ``<style>``, its data as
``<script type="application/json">`` and vanilla JavaScript) that works on the static page, offline,
and in Jupyter, JupyterLab and Colab too, which run the scripts of an HTML output. Every element id
carries a fresh per-call prefix, so several figures can share one page.

* :func:`schedule_explorer`: sliders for the schedule, ``beta_start``, ``beta_end``, ``T`` and ``t``.
  The page computes the betas exactly as :func:`ddpm_lib.make_beta_schedule` does (book equations
  ``eq-linear-schedule``, ``eq-cosine-schedule``, ``eq-betas-from-alphabar``), alpha-bar by a
  cumulative product in float64 (``eq-alpha-bar``; JavaScript numbers are float64), the log-SNR
  (``eq-snr``), and draws both curves and ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``
  (``eq-q-sample``) for an embedded image and a fixed, seeded ``eps``. ddpm_lib's own alpha-bar
  at a handful of settings is embedded too, so that a browser test can compare the page with the
  library (``window.ddpmSchedule.alphaBar``).
* :func:`chain_scrubber`: a slider through precomputed frames of a reverse chain (``x_t`` and the
  network's ``x_0`` prediction, as base64 PNGs) labelled with the paper's ``t``.

Both return a :class:`WebFigure`, which Jupyter displays through ``_repr_html_`` (the same as
``IPython.display.HTML``); ``figure.data`` is the HTML text and ``figure.save(path)`` writes a
standalone page.
"""
from __future__ import annotations

import base64
import html as _html
import io
import json
import math
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "WebFigure",
    "schedule_explorer",
    "chain_scrubber",
    "schedule_reference",
    "REFERENCE_SETTINGS",
    "SCHEDULE_JS",
    "T_RANGE",
    "BETA_START_VALUES",
    "BETA_END_VALUES",
]

# ---------------------------------------------------------------------------------------------------
# Slider ranges. The beta sliders step through "nice" decimal values (mantissas below times powers of
# ten), parsed in the page from their decimal text, so that 1e-4 and 0.02 are exactly the numbers a
# Python literal gives and the page's betas equal make_beta_schedule(..., beta_start=1e-4, ...).
_MANTISSAS = ("1", "1.2", "1.5", "2", "2.5", "3", "4", "5", "6", "8")


def _ladder(lo_exp: int, hi: str) -> List[str]:
    out = []
    for e in range(lo_exp, 1):
        for m in _MANTISSAS:
            text = f"{m}e{e}"
            out.append(text)
            if float(text) >= float(hi):
                return out
    return out


BETA_START_VALUES: List[str] = _ladder(-5, "1e-2")  # 1e-5 .. 1e-2
BETA_END_VALUES: List[str] = _ladder(-3, "5e-1")  # 1e-3 .. 0.5
T_RANGE = (10, 2000, 10)  # min, max, step of the T slider (the paper: T = 1000)

# ddpm_lib's alpha-bar at these settings is embedded in every schedule explorer (see
# schedule_reference); ``beta_start``/``beta_end`` absent means the library's defaults, scaled by
# 1000/T for linear, quadratic and sigmoid.
REFERENCE_SETTINGS: tuple = (
    {"name": "linear", "T": 1000},
    {"name": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02},
    {"name": "linear", "T": 50},
    {"name": "linear", "T": 2000, "beta_start": 1e-5, "beta_end": 0.3},
    {"name": "cosine", "T": 1000},
    {"name": "cosine", "T": 50},
    {"name": "quadratic", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02},
    {"name": "quadratic", "T": 200},
    {"name": "sigmoid", "T": 1000},
    {"name": "sigmoid", "T": 300, "beta_start": 1e-5, "beta_end": 0.05},
)


class WebFigure:
    """Self-contained HTML of one interactive figure; Jupyter shows it through ``_repr_html_``.

    Attributes:
        data: the HTML text (a ``<div>`` with its style, data and scripts).
        element_id: the id of the figure's outer ``<div>`` (unique per call).
        kind: ``"schedule-explorer"`` or ``"chain-scrubber"``.
        payload: the JSON data embedded in the page (a dict).
    """

    def __init__(self, data: str, element_id: str, kind: str, payload: Dict[str, Any]):
        self.data = data
        self.element_id = element_id
        self.kind = kind
        self.payload = payload

    def _repr_html_(self) -> str:
        return self.data

    def __html__(self) -> str:  # Jinja/markupsafe protocol
        return self.data

    def __repr__(self) -> str:
        return f"<WebFigure {self.kind} id={self.element_id!r}, {len(self.data):,} characters of HTML>"

    def save(self, path: Union[str, Path], title: Optional[str] = None) -> Path:
        """Write a standalone HTML page holding this figure; returns the path."""
        path = Path(path)
        title = _html.escape(title or self.kind)
        path.write_text(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title></head>\n<body>\n{self.data}\n</body></html>\n",
            encoding="utf-8",
        )
        return path


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _json_for_script(obj: Any) -> str:
    """JSON safe inside a <script> element (no "</", no "<!--")."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _as_numpy(x, argument: str) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{argument} must be a tensor or an array of numbers: {err}") from None
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{argument} must be finite")
    return arr


# ---------------------------------------------------------------------------------------------------
# Schedules in JavaScript. Each line mirrors ddpm_lib.schedules; see the module docstring there.
SCHEDULE_JS = r"""
(function (root) {
  "use strict";
  var VERSION = 1;
  if (root.ddpmSchedule && root.ddpmSchedule.version >= VERSION) { return; }
  var NAMES = ["linear", "cosine", "quadratic", "sigmoid"];

  function checkT(T) {
    if (typeof T !== "number" || !isFinite(T) || Math.floor(T) !== T || T < 1) {
      throw new Error("T must be an integer >= 1, got " + T);
    }
  }
  // numpy.linspace(a, b, n) with endpoint=True, operation for operation
  function linspace(a, b, n) {
    var y = new Float64Array(n), i;
    if (n === 1) { y[0] = a; return y; }
    var div = n - 1, delta = b - a, step = delta / div;
    for (i = 0; i < n; i++) { y[i] = (step === 0) ? (i / div) * delta + a : i * step + a; }
    y[n - 1] = b;
    return y;
  }
  // the library's ends: the paper's 1e-4 and 0.02 at T = 1000, both scaled by 1000/T
  function ends(T, betaStart, betaEnd) {
    var scale = 1000.0 / T;
    var start = (betaStart === null || betaStart === undefined) ? scale * 1e-4 : betaStart;
    var end = (betaEnd === null || betaEnd === undefined) ? scale * 0.02 : betaEnd;
    return [start, end];
  }
  function betas(name, T, betaStart, betaEnd) {
    checkT(T);
    var b, i, e;
    if (name === "linear") {
      e = ends(T, betaStart, betaEnd);
      b = linspace(e[0], e[1], T);
    } else if (name === "quadratic") {  // linear in sqrt(beta)
      e = ends(T, betaStart, betaEnd);
      b = linspace(Math.sqrt(e[0]), Math.sqrt(e[1]), T);
      for (i = 0; i < T; i++) { b[i] = b[i] * b[i]; }
    } else if (name === "sigmoid") {  // a sigmoid on linspace(-6, 6, T) between the two ends
      e = ends(T, betaStart, betaEnd);
      var x = linspace(-6.0, 6.0, T);
      b = new Float64Array(T);
      for (i = 0; i < T; i++) { b[i] = 1.0 / (1.0 + Math.exp(-x[i])) * (e[1] - e[0]) + e[0]; }
    } else if (name === "cosine") {  // Improved DDPM: s = 0.008, betas clipped at 0.999
      var s = 0.008, maxBeta = 0.999;
      var f = function (u) { var c = Math.cos((u + s) / (1 + s) * Math.PI / 2); return c * c; };
      var f0 = f(0.0);
      b = new Float64Array(T);
      for (i = 0; i < T; i++) {
        var t1 = i / T, t2 = (i + 1) / T;
        b[i] = Math.min(1.0 - (f(t2) / f0) / (f(t1) / f0), maxBeta);
      }
    } else {
      throw new Error("unknown schedule name " + name + "; choose one of " + NAMES.join(", "));
    }
    for (i = 0; i < T; i++) {
      if (!(b[i] > 0 && b[i] < 1)) { throw new Error(name + " schedule: betas must lie in (0, 1)"); }
    }
    return b;
  }
  // alpha-bar_t = prod_{s <= t} (1 - beta_s), a sequential product in float64 (numpy.cumprod)
  function alphaBarFromBetas(b) {
    var ab = new Float64Array(b.length), p = 1.0;
    for (var i = 0; i < b.length; i++) { p = (i === 0) ? (1.0 - b[0]) : p * (1.0 - b[i]); ab[i] = p; }
    return ab;
  }
  function logSnr(ab) {  // log(abar / (1 - abar))
    var out = new Float64Array(ab.length);
    for (var i = 0; i < ab.length; i++) { out[i] = Math.log(ab[i]) - Math.log1p(-ab[i]); }
    return out;
  }
  root.ddpmSchedule = {
    version: VERSION,
    names: NAMES.slice(),
    linspace: linspace,
    betasTyped: betas,
    alphaBarTyped: function (name, T, bs, be) { return alphaBarFromBetas(betas(name, T, bs, be)); },
    alphaBarFromBetas: alphaBarFromBetas,
    logSnrTyped: logSnr,
    // plain arrays, for tests (WebDriver returns them as lists)
    betas: function (name, T, bs, be) { return Array.from(betas(name, T, bs, be)); },
    alphaBar: function (name, T, bs, be) { return Array.from(alphaBarFromBetas(betas(name, T, bs, be))); },
    logSnr: function (name, T, bs, be) { return Array.from(logSnr(alphaBarFromBetas(betas(name, T, bs, be)))); }
  };
})(typeof window !== "undefined" ? window : globalThis);
"""

# The explorer's drawing code; ID is replaced by the figure's id.
_EXPLORER_JS = r"""
(function () {
  "use strict";
  var ID = "__ID__";
  var root = document.getElementById(ID);
  if (!root || root.getAttribute("data-ready") === "1") { return; }
  var S = window.ddpmSchedule;
  var cfg = JSON.parse(document.getElementById(ID + "-data").textContent);
  function q(suffix) { return document.getElementById(ID + "-" + suffix); }
  var el = {
    schedule: q("schedule"), T: q("T"), t: q("t"), bs: q("beta-start"), be: q("beta-end"),
    scaled: q("scaled"), Tout: q("T-out"), tout: q("t-out"), bsout: q("beta-start-out"),
    beout: q("beta-end-out"), readout: q("readout"), note: q("note"),
    abarLine: q("abar-line"), abarRef: q("abar-ref"), abarMark: q("abar-mark"), abarDot: q("abar-dot"),
    snrLine: q("snr-line"), snrRef: q("snr-ref"), snrMark: q("snr-mark"), snrDot: q("snr-dot"),
    snrTicks: q("snr-ticks"), x0: q("x0"), xt: q("xt"), xtLabel: q("xt-label")
  };
  var W = cfg.plot.width, H = cfg.plot.height, P = cfg.plot.pad;  // plot box inside the SVG
  var ref = S.alphaBarTyped("linear", 1000, 1e-4, 0.02);          // the paper's schedule
  var refSnr = S.logSnrTyped(ref);
  var drawCount = 0;

  function trim(m) {  // "1.200" -> "1.2", "3.000" -> "3"
    if (m.indexOf(".") < 0) { return m; }
    while (m.charAt(m.length - 1) === "0") { m = m.slice(0, -1); }
    return (m.charAt(m.length - 1) === ".") ? m.slice(0, -1) : m;
  }
  function fmt(v) {
    if (v === 0) { return "0"; }
    var a = Math.abs(v);
    if (a < 1e-3 || a >= 1e4) { var e = v.toExponential(2).split("e"); return trim(e[0]) + "e" + e[1]; }
    return trim(v.toPrecision(4));
  }
  function sx(u) { return P.left + u * (W - P.left - P.right); }
  function sy(v, lo, hi) { return P.top + (1 - (v - lo) / (hi - lo)) * (H - P.top - P.bottom); }
  function points(vals, lo, hi) {
    var n = vals.length, out = new Array(n);
    for (var i = 0; i < n; i++) {
      var v = Math.min(Math.max(vals[i], lo), hi);
      out[i] = sx((i + 1) / n).toFixed(2) + "," + sy(v, lo, hi).toFixed(2);
    }
    return out.join(" ");
  }
  function state() {
    var name = el.schedule.value;
    var T = parseInt(el.T.value, 10);
    var scaled = el.scaled.checked;
    var bs = null, be = null;
    if (name !== "cosine" && !scaled) {
      bs = parseFloat(cfg.betaStartValues[parseInt(el.bs.value, 10)]);
      be = parseFloat(cfg.betaEndValues[parseInt(el.be.value, 10)]);
    }
    if (parseInt(el.t.max, 10) !== T) { el.t.max = String(T); }
    var t = Math.min(Math.max(parseInt(el.t.value, 10), 1), T);
    return { name: name, T: T, t: t, bs: bs, be: be, scaled: scaled };
  }
  function drawImage(canvas, vals, lo, hi) {
    var img = cfg.image, n = img.height * img.width, ctx = canvas.getContext("2d");
    var out = ctx.createImageData(img.width, img.height);
    for (var p = 0; p < n; p++) {
      for (var k = 0; k < 4; k++) {
        var c = (k === 3) ? 255 : Math.round((Math.min(Math.max(vals[(k < img.channels ? k : 0) * n + p], lo), hi) - lo) / (hi - lo) * 255);
        out.data[4 * p + k] = c;
      }
    }
    ctx.putImageData(out, 0, 0);
  }
  function draw() {
    var s = state(), bet, ab, snr;
    try {
      bet = S.betasTyped(s.name, s.T, s.bs, s.be);
    } catch (err) {
      el.note.textContent = (s.scaled ? "The default ends scaled by 1000/T give \u03b2 \u2265 1 at T = " + s.T +
        ": pick a larger T or set the ends. " : "") + String(err.message || err);
      root.setAttribute("data-error", String(err.message || err));
      return;
    }
    root.removeAttribute("data-error");
    ab = S.alphaBarFromBetas(bet);
    snr = S.logSnrTyped(ab);
    var lo = 1e300, hi = -1e300, i;
    for (i = 0; i < snr.length; i++) { lo = Math.min(lo, snr[i]); hi = Math.max(hi, snr[i]); }
    for (i = 0; i < refSnr.length; i++) { lo = Math.min(lo, refSnr[i]); hi = Math.max(hi, refSnr[i]); }
    lo = Math.max(-40, Math.floor(lo / 5) * 5); hi = Math.min(40, Math.ceil(hi / 5) * 5);
    if (hi - lo < 10) { hi = lo + 10; }
    el.abarLine.setAttribute("points", points(ab, 0, 1));
    el.abarRef.setAttribute("points", points(ref, 0, 1));
    el.snrLine.setAttribute("points", points(snr, lo, hi));
    el.snrRef.setAttribute("points", points(refSnr, lo, hi));
    var xm = sx(s.t / s.T).toFixed(2), abt = ab[s.t - 1], snrt = snr[s.t - 1];
    [el.abarMark, el.snrMark].forEach(function (m) { m.setAttribute("x1", xm); m.setAttribute("x2", xm); });
    el.abarDot.setAttribute("cx", xm); el.abarDot.setAttribute("cy", sy(abt, 0, 1).toFixed(2));
    el.snrDot.setAttribute("cx", xm); el.snrDot.setAttribute("cy", sy(Math.min(Math.max(snrt, lo), hi), lo, hi).toFixed(2));
    var ticks = "", step = (hi - lo) > 30 ? 10 : 5;
    for (var v = Math.ceil(lo / step) * step; v <= hi; v += step) {
      var y = sy(v, lo, hi).toFixed(1);
      ticks += '<line x1="' + P.left + '" x2="' + (W - P.right) + '" y1="' + y + '" y2="' + y + '" class="ddpm-grid"/>' +
        '<text x="' + (P.left - 4) + '" y="' + y + '" dy="0.32em" text-anchor="end">' + v + "</text>";
    }
    el.snrTicks.innerHTML = ticks;
    // x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq-q-sample)
    var a = Math.sqrt(abt), b = Math.sqrt(1 - abt), x0 = cfg.image.x0, eps = cfg.image.eps;
    var xt = new Float64Array(x0.length), sum = 0;
    for (i = 0; i < x0.length; i++) { xt[i] = a * x0[i] + b * eps[i]; sum += xt[i]; }
    drawImage(el.xt, xt, -1, 1);
    // readouts
    el.Tout.textContent = String(s.T);
    el.tout.textContent = String(s.t);
    var usedEnds = (s.name === "cosine") ? null : (s.bs === null ? [1000 / s.T * 1e-4, 1000 / s.T * 0.02] : [s.bs, s.be]);
    el.bsout.textContent = usedEnds ? fmt(usedEnds[0]) : "\u2013";
    el.beout.textContent = usedEnds ? fmt(usedEnds[1]) : "\u2013";
    el.bs.disabled = el.be.disabled = (s.name === "cosine" || s.scaled);
    el.scaled.disabled = (s.name === "cosine");
    el.note.textContent = (s.name === "cosine")
      ? "cosine: \u1fb1(t) = f(t)/f(0), f(t) = cos\u00b2(((t/T + s)/(1 + s))\u00b7\u03c0/2), s = 0.008, \u03b2 clipped at 0.999; the \u03b2 sliders do not apply"
      : (s.scaled ? "library default ends: 10\u207b\u2074 and 0.02, both scaled by 1000/T = " + fmt(1000 / s.T)
                  : "\u03b2\u2081 and \u03b2_T used as set (no 1000/T scaling)");
    el.readout.textContent = "t = " + s.t + " of T = " + s.T + "\n\u03b2_t = " + fmt(bet[s.t - 1]) +
      "\n\u1fb1_t = " + fmt(abt) + "\nlog SNR = " + snrt.toFixed(3) + "\n\u1fb1_T = " + fmt(ab[s.T - 1]) +
      " (end of chain)\nx_t = \u221a\u1fb1_t x_0 + \u221a(1 \u2212 \u1fb1_t) \u03b5";
    el.xtLabel.innerHTML = "<i>x</i><sub><i>t</i></sub> at <i>t</i> = " + s.t;
    drawCount += 1;
    var d = {
      "data-schedule": s.name, "data-num-steps": String(s.T), "data-t": String(s.t),
      "data-beta-start": s.bs === null ? "" : String(s.bs), "data-beta-end": s.be === null ? "" : String(s.be),
      "data-scaled": s.scaled ? "1" : "0", "data-alpha-bar-t": String(abt), "data-alpha-bar-end": String(ab[s.T - 1]),
      "data-log-snr-t": String(snrt), "data-xt-sum": String(sum), "data-draw-count": String(drawCount)
    };
    for (var key in d) { root.setAttribute(key, d[key]); }
  }
  drawImage(el.x0, cfg.image.x0, -1, 1);
  [el.schedule, el.T, el.t, el.bs, el.be, el.scaled].forEach(function (c) {
    c.addEventListener("input", draw);
    c.addEventListener("change", draw);
  });
  draw();
  var fb = q("fallback");
  if (fb) { fb.style.display = "none"; }
  root.setAttribute("data-ready", "1");
})();
"""

_STYLE = """
<style>
.ddpm-web { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 0.85rem;
  border: 1px solid rgba(128,128,128,0.35); border-radius: 6px; padding: 0.6rem 0.8rem; margin: 0.6rem 0;
  max-width: 100%; box-sizing: border-box; color: inherit; }
.ddpm-web .ddpm-controls { display: flex; flex-wrap: wrap; gap: 0.3rem 1.2rem; align-items: center; margin-bottom: 0.4rem; }
.ddpm-web label { display: inline-flex; align-items: center; gap: 0.35rem; white-space: nowrap; margin: 0; }
.ddpm-web input[type=range] { width: 10rem; vertical-align: middle; }
.ddpm-web output { display: inline-block; min-width: 3.6em; font-variant-numeric: tabular-nums; }
.ddpm-web .ddpm-panels { display: flex; flex-wrap: wrap; gap: 0.6rem; align-items: flex-start; }
.ddpm-web .ddpm-plots svg { flex: 1 1 240px; min-width: 0; width: 100%; max-width: 420px; height: auto; overflow: visible; }
.ddpm-web svg text { fill: currentColor; font-size: 11px; }
.ddpm-web .ddpm-axis { stroke: currentColor; stroke-width: 1; fill: none; }
.ddpm-web .ddpm-grid { stroke: rgba(128,128,128,0.25); stroke-width: 1; }
.ddpm-web .ddpm-curve { stroke: #1f77b4; stroke-width: 2; fill: none; }
.ddpm-web .ddpm-ref { stroke: #888; stroke-width: 1.2; stroke-dasharray: 5 4; fill: none; }
.ddpm-web .ddpm-mark { stroke: currentColor; stroke-width: 1; stroke-dasharray: 2 3; }
.ddpm-web .ddpm-dot { fill: #d62728; }
.ddpm-web canvas, .ddpm-web img.ddpm-frame { image-rendering: pixelated; image-rendering: crisp-edges;
  border: 1px solid rgba(128,128,128,0.4); background: #000; }
.ddpm-web figure { margin: 0; text-align: center; }
.ddpm-web figcaption { font-size: 0.8rem; }
.ddpm-web .ddpm-readout { font-variant-numeric: tabular-nums; margin-top: 0.3rem; }
.ddpm-web .ddpm-note { opacity: 0.75; font-size: 0.78rem; }
.ddpm-web .ddpm-fallback { opacity: 0.75; font-style: italic; }
.ddpm-web button { font: inherit; padding: 0.1rem 0.6rem; }
</style>
"""


def _axes_svg(fid: str, which: str, title: str, width: int, height: int, pad: Dict[str, int]) -> str:
    left, right, top, bottom = pad["left"], width - pad["right"], pad["top"], height - pad["bottom"]
    xt = "".join(
        f'<line x1="{left + u * (right - left):.1f}" x2="{left + u * (right - left):.1f}" y1="{bottom}" '
        f'y2="{bottom + 4}" class="ddpm-axis"/><text x="{left + u * (right - left):.1f}" y="{bottom + 15}" '
        f'text-anchor="middle">{u:g}</text>'
        for u in (0, 0.25, 0.5, 0.75, 1)
    )
    if which == "abar":
        yt = "".join(
            f'<line x1="{left}" x2="{right}" y1="{top + (1 - v) * (bottom - top):.1f}" '
            f'y2="{top + (1 - v) * (bottom - top):.1f}" class="ddpm-grid"/>'
            f'<text x="{left - 4}" y="{top + (1 - v) * (bottom - top):.1f}" dy="0.32em" text-anchor="end">{v:g}</text>'
            for v in (0, 0.25, 0.5, 0.75, 1)
        )
        ticks = f'<g>{yt}</g>'
    else:
        ticks = f'<g id="{fid}-snr-ticks"></g>'
    return (
        f'<svg id="{fid}-{which}-svg" viewBox="0 0 {width} {height}" role="img" aria-label="{_html.escape(title)}">'
        f'<text x="{(left + right) / 2:.1f}" y="12" text-anchor="middle" font-weight="bold">{title}</text>'
        f"{ticks}"
        f'<polyline id="{fid}-{which}-ref" class="ddpm-ref" points=""/>'
        f'<polyline id="{fid}-{which}-line" class="ddpm-curve" points=""/>'
        f'<line id="{fid}-{which}-mark" class="ddpm-mark" x1="0" x2="0" y1="{top}" y2="{bottom}"/>'
        f'<circle id="{fid}-{which}-dot" class="ddpm-dot" r="3.5" cx="-10" cy="-10"/>'
        f'<polyline class="ddpm-axis" points="{left},{top} {left},{bottom} {right},{bottom}"/>'
        f"{xt}"
        f'<text x="{(left + right) / 2:.1f}" y="{height - 2}" text-anchor="middle">t / T</text>'
        "</svg>"
    )


def _default_image() -> np.ndarray:
    from .data import DatasetUnavailableError, load_dataset, load_digits

    try:
        data = load_dataset("fashion_mnist", split="test", limit=1, pad_to=32, download=False)
    except (DatasetUnavailableError, OSError):
        data = load_digits()
    return data.images[0].double().numpy()


def _image_chw(image) -> np.ndarray:
    arr = _as_numpy(image, "image")
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (H, W), (C, H, W) or (1, C, H, W) with C = 1 or 3, got {arr.shape}")
    if arr.shape[1] * arr.shape[2] > 64 * 64:
        raise ValueError(f"image must have at most 64x64 pixels (it is embedded in the page), got {arr.shape[1:]}")
    return arr


def schedule_reference(settings: Sequence[Dict[str, Any]] = REFERENCE_SETTINGS,
                       indices_per_setting: int = 9) -> List[Dict[str, Any]]:
    """ddpm_lib's alpha-bar at a few schedule settings, for comparison with the page's JavaScript.

    Each setting is a dict ``{"name", "T"}`` with optional ``beta_start``, ``beta_end`` (absent: the
    library's scaled defaults). Returns one dict per setting with ``"index"`` (0-based code
    timesteps, the first, the last and a few between) and ``"alpha_bar"`` (the values of
    ``GaussianDiffusion(betas=make_beta_schedule(...)).alphas_cumprod`` there, float64, exact in JSON).
    """
    from .diffusion import GaussianDiffusion
    from .schedules import make_beta_schedule

    out = []
    for s in settings:
        opts = {k: s[k] for k in ("beta_start", "beta_end") if s.get(k) is not None}
        T = int(s["T"])
        ab = GaussianDiffusion(betas=make_beta_schedule(s["name"], T, **opts)).alphas_cumprod.numpy()
        idx = sorted({0, T - 1, *np.linspace(0, T - 1, indices_per_setting).round().astype(int).tolist()})
        out.append({
            "name": s["name"], "T": T,
            "beta_start": opts.get("beta_start"), "beta_end": opts.get("beta_end"),
            "index": idx, "alpha_bar": [float(ab[i]) for i in idx],
        })
    return out


def schedule_explorer(
    image=None,
    schedules: Sequence[str] = ("linear", "cosine", "quadratic", "sigmoid"),
    *,
    schedule: str = "linear",
    T: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    t: Optional[int] = None,
    seed: int = 0,
    scaled: bool = False,
    reference_settings: Sequence[Dict[str, Any]] = REFERENCE_SETTINGS,
    title: str = "Noise schedules: \u1fb1_t, log SNR and x_t",
) -> WebFigure:
    """An interactive schedule figure that runs in the page's JavaScript (no kernel).

    Controls: a schedule menu, ``T`` (10..2000 in steps of 10), the paper's ``t`` (1..T),
    ``beta_start`` (1e-5..1e-2) and ``beta_end`` (1e-3..0.5), both on a ladder of round decimal
    values, and a check box "library default ends".

    How the sliders map to the library: with the box unchecked (the default) the page computes
    ``make_beta_schedule(name, T, beta_start=..., beta_end=...)``: the ends are used as set, with no
    1000/T scaling (so ``T = 100`` with the paper's ends shows how little noise a short chain adds).
    Checked, it computes ``make_beta_schedule(name, T)``: the library's defaults 1e-4 and 0.02 both
    scaled by 1000/T (book ``eq-linear-schedule``). The cosine schedule (``eq-cosine-schedule``,
    ``s = 0.008``, betas clipped at 0.999) has no ends, and the beta sliders are disabled for it.

    The page draws alpha-bar_t (``eq-alpha-bar``) and log SNR (``eq-snr``) against ``t / T`` with the
    paper's schedule (linear, T = 1000) dashed, and ``x_0`` next to
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (``eq-q-sample``; both shown clipped to
    [-1, 1]), where ``eps`` is a fixed standard normal draw (``numpy.random.default_rng(seed)``).

    Args:
        image: ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)`` in [-1, 1], C = 1 or 3, at most 64x64
            (tensor or array). None: the first Fashion-MNIST test image padded to 32x32 where the
            files are on disk, else the first of scikit-learn's 8x8 digits.
        schedules: the names in the menu (a subset of the library's four).
        schedule, T, beta_start, beta_end, t, scaled: the initial state (beta values snap to the
            nearest value of the slider's ladder; t None: ``T // 2``).
        reference_settings: settings at which ddpm_lib's alpha-bar is embedded (see
            :func:`schedule_reference`) for a browser test.
    Returns:
        a :class:`WebFigure`. In the page, ``window.ddpmSchedule.alphaBar(name, T, beta_start,
        beta_end)`` returns the page's alpha-bar (null ends: the library's scaled defaults), and the
        figure's ``<div>`` carries the drawn state in ``data-`` attributes (``data-alpha-bar-t``,
        ``data-draw-count``, ...).
    """
    from .schedules import SCHEDULES

    schedules = [str(s).lower() for s in schedules]
    unknown = [s for s in schedules if s not in SCHEDULES]
    if not schedules or unknown:
        raise ValueError(f"schedules must name some of {sorted(SCHEDULES)}, got {list(schedules)}")
    if schedule not in schedules:
        raise ValueError(f"schedule must be one of schedules={schedules}, got {schedule!r}")
    tmin, tmax, tstep = T_RANGE
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or not tmin <= T <= tmax or (T - tmin) % tstep:
        raise ValueError(f"T must be an int in {tmin}..{tmax} in steps of {tstep}, got {T!r}")
    if t is None:
        t = T // 2
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 1 <= t <= T:
        raise ValueError(f"t must be the paper's timestep, an int in 1..T={T}, got {t!r}")
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")

    x0 = _image_chw(_default_image() if image is None else image)
    C, Hh, Ww = x0.shape
    eps = np.random.default_rng(seed).standard_normal(x0.shape)
    fid = _new_id("ddpm-schedule")

    def nearest(values: List[str], v: float) -> int:
        return int(np.argmin([abs(math.log(float(s)) - math.log(v)) for s in values]))

    payload = {
        "version": 1,
        "schedules": schedules,
        "betaStartValues": BETA_START_VALUES,
        "betaEndValues": BETA_END_VALUES,
        "plot": {"width": 330, "height": 215, "pad": {"left": 40, "right": 10, "top": 20, "bottom": 34}},
        "image": {
            "channels": C, "height": Hh, "width": Ww, "seed": seed,
            "x0": [round(float(v), 6) for v in x0.reshape(-1)],
            "eps": [round(float(v), 6) for v in eps.reshape(-1)],
        },
        "reference": schedule_reference([s for s in reference_settings if s["name"] in schedules]),
    }
    pad = payload["plot"]["pad"]
    options = "".join(
        f'<option value="{s}"{" selected" if s == schedule else ""}>{s}</option>' for s in schedules
    )
    bs_i, be_i = nearest(BETA_START_VALUES, beta_start), nearest(BETA_END_VALUES, beta_end)
    scale = max(1, 128 // max(Hh, Ww))
    abar_svg = _axes_svg(fid, "abar", "\u1fb1_t", 330, 215, pad)
    snr_svg = _axes_svg(fid, "snr", "log SNR = log(\u1fb1_t / (1 \u2212 \u1fb1_t))", 330, 215, pad)
    html = f"""{_STYLE}
<div id="{fid}" class="ddpm-web ddpm-schedule-explorer" data-ddpm-widget="schedule-explorer">
<div style="font-weight:bold;margin-bottom:0.3rem">{_html.escape(title)}</div>
<div class="ddpm-controls">
  <label>schedule <select id="{fid}-schedule">{options}</select></label>
  <label>T <input id="{fid}-T" type="range" min="{tmin}" max="{tmax}" step="{tstep}" value="{T}"><output id="{fid}-T-out">{T}</output></label>
  <label>t <input id="{fid}-t" type="range" min="1" max="{T}" step="1" value="{t}"><output id="{fid}-t-out">{t}</output></label>
</div>
<div class="ddpm-controls">
  <label>\u03b2\u2081 <input id="{fid}-beta-start" type="range" min="0" max="{len(BETA_START_VALUES) - 1}" step="1" value="{bs_i}"><output id="{fid}-beta-start-out">{BETA_START_VALUES[bs_i]}</output></label>
  <label>\u03b2_T <input id="{fid}-beta-end" type="range" min="0" max="{len(BETA_END_VALUES) - 1}" step="1" value="{be_i}"><output id="{fid}-beta-end-out">{BETA_END_VALUES[be_i]}</output></label>
  <label><input id="{fid}-scaled" type="checkbox"{" checked" if scaled else ""}> library default ends (scaled by 1000/T)</label>
</div>
<div class="ddpm-note" id="{fid}-note"></div>
<div class="ddpm-panels ddpm-plots">
{abar_svg}
{snr_svg}
</div>
<div class="ddpm-panels">
<figure><canvas id="{fid}-x0" width="{Ww}" height="{Hh}" style="width:{Ww * scale}px;height:{Hh * scale}px"></canvas><figcaption><i>x</i><sub>0</sub></figcaption></figure>
<figure><canvas id="{fid}-xt" width="{Ww}" height="{Hh}" style="width:{Ww * scale}px;height:{Hh * scale}px"></canvas><figcaption id="{fid}-xt-label"><i>x</i><sub><i>t</i></sub></figcaption></figure>
<div class="ddpm-readout" id="{fid}-readout" style="flex:1 1 12rem;white-space:pre-line"></div>
</div>
<div class="ddpm-note">Computed in this page's JavaScript, in float64, from the same formulas as <code>ddpm_lib.make_beta_schedule</code>; solid: the chosen schedule, dashed: the paper's (linear, T = 1000). Images clipped to [\u22121, 1]; \u03b5 is a fixed draw (seed {seed}).</div>
<div class="ddpm-fallback" id="{fid}-fallback">This interactive figure needs JavaScript (the web book, Jupyter or Colab run it).</div>
<script type="application/json" id="{fid}-data">{_json_for_script(payload)}</script>
<script>{SCHEDULE_JS}</script>
<script>{_EXPLORER_JS.replace("__ID__", fid)}</script>
</div>"""
    return WebFigure(html, fid, "schedule-explorer", payload)


# ---------------------------------------------------------------------------------------------------
_SCRUBBER_JS = r"""
(function () {
  "use strict";
  var ID = "__ID__";
  var root = document.getElementById(ID);
  if (!root || root.getAttribute("data-ready") === "1") { return; }
  var cfg = JSON.parse(document.getElementById(ID + "-data").textContent);
  function q(suffix) { return document.getElementById(ID + "-" + suffix); }
  var slider = q("slider"), xt = q("xt"), x0 = q("x0"), label = q("label"), play = q("play");
  var timer = null;
  function show() {
    var i = Math.min(Math.max(parseInt(slider.value, 10), 0), cfg.frames.length - 1), f = cfg.frames[i];
    xt.src = f.x_t; x0.src = f.pred_x0;
    label.textContent = "t = " + f.t + (cfg.codeOffset ? "  (code index " + (f.t - cfg.codeOffset) + ")" : "") +
      "   \u2022   frame " + (i + 1) + " of " + cfg.frames.length;
    q("xt-cap").innerHTML = "<i>x</i><sub><i>t</i></sub> at <i>t</i> = " + f.t;
    q("x0-cap").innerHTML = "<i>x\u0302</i><sub>0</sub> predicted at <i>t</i> = " + f.t;
    root.setAttribute("data-frame", String(i));
    root.setAttribute("data-t", String(f.t));
  }
  function stop() { if (timer !== null) { clearInterval(timer); timer = null; } play.textContent = "\u25b6 play"; }
  play.addEventListener("click", function () {
    if (timer !== null) { stop(); return; }
    if (parseInt(slider.value, 10) >= cfg.frames.length - 1) { slider.value = "0"; }
    play.textContent = "\u275a\u275a pause";
    timer = setInterval(function () {
      var i = parseInt(slider.value, 10) + 1;
      if (i >= cfg.frames.length) { stop(); return; }
      slider.value = String(i); show();
    }, cfg.intervalMs);
  });
  slider.addEventListener("input", show);
  slider.addEventListener("change", show);
  show();
  var fb = q("fallback");
  if (fb) { fb.style.display = "none"; }
  root.setAttribute("data-ready", "1");
})();
"""


def _frames_array(frames, argument: str) -> np.ndarray:
    arr = _as_numpy(frames, argument)
    if arr.ndim == 3:  # (K, H, W)
        arr = arr[:, None, None]
    elif arr.ndim == 4:  # (K, C, H, W)
        arr = arr[:, None]
    if arr.ndim != 5 or arr.shape[2] not in (1, 3):
        raise ValueError(f"{argument} must have shape (K, B, C, H, W), (K, C, H, W) or (K, H, W) with C = 1 or 3, "
                         f"got {tuple(np.shape(frames))}")
    return arr


def _png_data_uri(grid: np.ndarray) -> str:
    from PIL import Image

    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid, mode="L" if grid.shape[-1] == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chain_scrubber(
    x_t_frames,
    pred_x0_frames,
    timesteps: Sequence[int],
    *,
    code_timesteps: bool = True,
    max_frames: int = 60,
    spacing: str = "uniform",
    max_images: int = 8,
    nrow: int = 4,
    width: int = 300,
    interval_ms: int = 120,
    title: str = "The reverse chain: x_t and the network's prediction of x_0",
) -> WebFigure:
    """A slider through precomputed frames of one sampling run (Algorithm 2), no kernel needed.

    Typical use, with the chain that ``ddpm_sample(..., return_intermediates=True)`` returns::

        x, chain = ddpm_sample(model, diffusion, shape, return_intermediates=True)
        chain_scrubber(chain["x_t"], chain["pred_x0"], chain["t"])

    Args:
        x_t_frames: ``(K, B, C, H, W)`` (or ``(K, C, H, W)``, ``(K, H, W)``) images in [-1, 1]:
            ``x_t`` at each recorded step. The first ``max_images`` samples are shown, ``nrow`` a row.
        pred_x0_frames: the same shape: the x_0 prediction at each recorded step.
        timesteps: ``K`` timesteps. ``code_timesteps=True`` (the default) means 0-based code indices
            as ``ddpm_sample`` records them, labelled with the paper's ``t = index + 1``;
            ``False``: already the paper's ``t``.
        max_frames: at most this many frames are embedded, always with the first and the last.
        spacing: how those frames are picked among the recorded ones: ``"uniform"`` (evenly) or
            ``"quadratic"`` (denser towards t = 1, where the details of the image appear).
        width: the displayed width of each panel in CSS pixels (images scale up without smoothing).
        interval_ms: the frame time of the play button.
    Returns:
        a :class:`WebFigure`; the slider runs from the start of sampling (t = T) to its end (t = 1).
    """
    xs = _frames_array(x_t_frames, "x_t_frames")
    x0s = _frames_array(pred_x0_frames, "pred_x0_frames")
    if xs.shape != x0s.shape:
        raise ValueError(f"x_t_frames and pred_x0_frames must have the same shape, got {xs.shape} and {x0s.shape}")
    ts = [int(v) for v in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
    if len(ts) != xs.shape[0] or not ts:
        raise ValueError(f"timesteps must hold one timestep per frame ({xs.shape[0]}), got {len(ts)}")
    for name, v in (("max_frames", max_frames), ("max_images", max_images), ("nrow", nrow), ("width", width),
                    ("interval_ms", interval_ms)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    offset = 1 if code_timesteps else 0
    paper_t = [v + offset for v in ts]
    if min(paper_t) < 1:
        raise ValueError(f"timesteps must be >= {1 - offset} (code_timesteps={code_timesteps}), got {min(ts)}")
    if spacing not in ("uniform", "quadratic"):
        raise ValueError(f"spacing must be 'uniform' or 'quadratic', got {spacing!r}")
    order = sorted(range(len(ts)), key=lambda i: -paper_t[i])  # the order of sampling: t = T first
    if len(order) > max_frames:
        u = np.linspace(0.0, 1.0, max_frames)
        if spacing == "quadratic":  # denser towards t = 1, where the details appear
            u = 1.0 - (1.0 - u) ** 2
        picks = np.unique((u * (len(order) - 1)).round().astype(int))
        order = [order[i] for i in picks]

    from .data import image_grid

    frames = []
    grid_w = grid_h = 0
    for i in order:
        gx = image_grid(torch.from_numpy(xs[i, :max_images]).float().clamp(-1, 1), nrow=nrow, padding=1)
        g0 = image_grid(torch.from_numpy(x0s[i, :max_images]).float().clamp(-1, 1), nrow=nrow, padding=1)
        grid_h, grid_w = gx.shape[:2]
        frames.append({"t": paper_t[i], "x_t": _png_data_uri(gx), "pred_x0": _png_data_uri(g0)})
    fid = _new_id("ddpm-chain")
    payload = {"version": 1, "codeOffset": offset, "intervalMs": interval_ms, "frames": frames}
    disp_w = width
    first, last = frames[0], frames[-1]
    html = f"""{_STYLE}
<div id="{fid}" class="ddpm-web ddpm-chain-scrubber" data-ddpm-widget="chain-scrubber" data-frames="{len(frames)}">
<div style="font-weight:bold;margin-bottom:0.3rem">{_html.escape(title)}</div>
<div class="ddpm-controls">
  <label>step <input id="{fid}-slider" type="range" min="0" max="{len(frames) - 1}" step="1" value="0" style="width:18rem"></label>
  <button type="button" id="{fid}-play">\u25b6 play</button>
  <span id="{fid}-label" class="ddpm-readout">t = {first["t"]}</span>
</div>
<div class="ddpm-panels">
<figure><img id="{fid}-xt" class="ddpm-frame" alt="x_t" src="{first["x_t"]}" style="width:{disp_w}px;max-width:100%;height:auto;aspect-ratio:{grid_w}/{grid_h}"><figcaption id="{fid}-xt-cap"><i>x</i><sub><i>t</i></sub> at <i>t</i> = {first["t"]}</figcaption></figure>
<figure><img id="{fid}-x0" class="ddpm-frame" alt="predicted x_0" src="{first["pred_x0"]}" style="width:{disp_w}px;max-width:100%;height:auto;aspect-ratio:{grid_w}/{grid_h}"><figcaption id="{fid}-x0-cap"><i>x\u0302</i><sub>0</sub> predicted at <i>t</i> = {first["t"]}</figcaption></figure>
</div>
<div class="ddpm-note">{len(frames)} frames of one sampling run, precomputed when the page was built: the chain's state x_t and the x_0 that the network predicts from it (both clipped to [\u22121, 1]). The slider runs from t = {first["t"]} (pure noise) to t = {last["t"]}; the arrow keys step through it.</div>
<div class="ddpm-fallback" id="{fid}-fallback">Without JavaScript only the first frame shows; the web book, Jupyter and Colab run the slider.</div>
<script type="application/json" id="{fid}-data">{_json_for_script(payload)}</script>
<script>{_SCRUBBER_JS.replace("__ID__", fid)}</script>
</div>"""
    return WebFigure(html, fid, "chain-scrubber", payload)
