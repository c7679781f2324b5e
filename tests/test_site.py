"""The built web book, as a reader meets it: served on localhost and driven by headless Chromium.

* Every page in the table of contents loads with no JavaScript error (no SEVERE console entry, no
  uncaught exception), its maths is typeset by MathJax (no raw ``$$`` or TeX left in the text, every
  ``.math`` element holds an ``mjx-container``, no MathJax error box), and every ``ddpm_lib.web``
  figure on it has started.
* The schedule explorer (chapter 7): moving its controls with the mouse, the keyboard and events
  changes the drawing, the page's alpha-bar equals ddpm_lib's (at the values embedded at build time
  and at the states the test moves to), to 1e-12 relative.
* The chain scrubber (chapter 8): moving its slider changes the frame shown.
* Screenshots of every page land in ``_build/screenshots/`` (the schedule page after a slider move as
  ``schedule_after_slider.png``); with ``DDPM_UPDATE_FIGURES=1`` that one is also copied to
  ``book/figures/schedule_sliders_screenshot.png``.

The site: ``$DDPM_SITE_DIR`` if set (with ``$DDPM_SITE_TOC``, its table of contents, else every page
found in it), else ``_build/html`` from ``make book`` when it is newer than every book source, else
this test builds the book first (which executes every chapter: slow; ``make test`` builds it before).

The test machine is offline: Chromium resolves no host but localhost, and the test's server hands
the page a local copy of MathJax 3 in place of the CDN one (``npm install mathjax@3`` in
``~/.cache/ddpm-book-web``, or ``$DDPM_MATHJAX_DIR``: see ``.ci/run``). Failed loads of other
external resources (thebe, ipywidgets' CDN scripts) cannot be checked offline: they are listed in
the report ``_build/screenshots/site_report.json`` and not counted as errors.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.xdist_group("site"), pytest.mark.slow]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
MATHJAX_CDN = re.compile(r"https://cdn\.jsdelivr\.net/npm/mathjax@3[^\"']*/es5/(tex-mml-chtml|tex-chtml|tex-svg|tex-mml-svg)\.js")
OFFLINE_PREFIX = "/__offline__/mathjax/"
FIGURE = ROOT / "book" / "figures" / "schedule_sliders_screenshot.png"
SKIP_DIRS = {"_static", "_sources", "_images", "reports", "_sphinx_design_static", ".doctrees"}
SKIP_PAGES = {"genindex.html", "search.html", "index.html"}


def _missing(message: str):
    """Skip where a developer lacks the browser; CI must have it."""
    if IN_CI:
        pytest.fail(f"{message} (CI must install it: see .ci/run)")
    pytest.skip(message)


# ---- which site -----------------------------------------------------------------------------------
def _toc_entries(toc_path: Path) -> list[str]:
    import yaml

    toc = yaml.safe_load(toc_path.read_text())
    out: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if isinstance(node.get(key), str):
                    out.append(re.sub(r"\.(md|ipynb|rst)$", "", node[key]))
            for value in node.values():
                if isinstance(value, (list, dict)):
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return list(dict.fromkeys(out))


def _site_from_env() -> Path | None:
    value = os.environ.get("DDPM_SITE_DIR")
    return Path(value).resolve() if value else None


def _pages_for(site: Path | None) -> list[str]:
    """Page names (paths without .html) to check, known at collection time."""
    toc = os.environ.get("DDPM_SITE_TOC")
    if toc:
        return _toc_entries(Path(toc))
    if site is None:
        return _toc_entries(ROOT / "_toc.yml")
    if not site.is_dir():
        return []
    pages = []
    for p in sorted(site.rglob("*.html")):
        rel = p.relative_to(site)
        if rel.parts[0] in SKIP_DIRS or (len(rel.parts) == 1 and rel.name in SKIP_PAGES):
            continue
        pages.append(str(rel.with_suffix("")))
    return pages


PAGES = _pages_for(_site_from_env())


def _book_sources() -> list[Path]:
    files = [ROOT / "_config.yml", ROOT / "_toc.yml"]
    for p in (ROOT / "book").rglob("*"):
        if p.is_file() and p != FIGURE and not any(part in {".ipynb_checkpoints", "__pycache__"} for part in p.parts):
            files.append(p)
    return files


def _newest(paths) -> float:
    return max((p.stat().st_mtime for p in paths), default=0.0)


def _default_site() -> Path:
    site = ROOT / "_build" / "html"
    built = _newest(site.rglob("*.html")) if site.is_dir() else 0.0
    newest_source = _newest(_book_sources())
    if built >= newest_source and (site / "index.html").is_file():
        return site
    reason = "missing" if not built else "older than the book's sources"
    print(f"\n_build/html is {reason}: building the book (this executes every chapter)", flush=True)
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(ROOT), "--builder", "html", "-W", "-n",
           "--keep-going"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(f"book built in {time.perf_counter() - start:.0f} s", flush=True)
    assert proc.returncode == 0, f"the book build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return site


@pytest.fixture(scope="module")
def site() -> Path:
    path = _site_from_env()
    if path is not None:
        assert (path / "index.html").is_file() or any(path.glob("*.html")), f"DDPM_SITE_DIR={path} holds no site"
        return path
    return _default_site()


@pytest.fixture(scope="module")
def shots(site) -> Path:
    out = Path(os.environ.get("DDPM_SCREENSHOT_DIR") or site.parent / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    yield out
    if REPORT["pages"]:
        (out / "site_report.json").write_text(json.dumps(REPORT, indent=1))


# ---- serving it -----------------------------------------------------------------------------------
def _find_mathjax() -> Path | None:
    candidates = [os.environ.get("DDPM_MATHJAX_DIR", "")]
    candidates += [str(Path.home() / ".cache" / "ddpm-book-web" / "node_modules" / "mathjax"),
                   str(ROOT / "node_modules" / "mathjax"), "/usr/lib/node_modules/mathjax",
                   "/usr/local/lib/node_modules/mathjax", "/usr/share/nodejs/mathjax-full"]
    for c in filter(None, candidates):
        for es5 in (Path(c), Path(c) / "es5"):
            if (es5 / "tex-mml-chtml.js").is_file():
                return es5
    return None


class _Handler(http.server.SimpleHTTPRequestHandler):
    mathjax: Path | None = None
    requests: list = []

    def log_message(self, fmt, *args):  # quiet; keep a record instead
        pass

    def send_head(self):
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith(OFFLINE_PREFIX) and self.mathjax is not None:
            target = (self.mathjax / path[len(OFFLINE_PREFIX):]).resolve()
            if self.mathjax.resolve() in target.parents and target.is_file():
                return self._send_bytes(target.read_bytes(), self.guess_type(str(target)))
            self.send_error(404)
            return None
        local = Path(self.translate_path(self.path))
        if local.is_dir():
            local = local / "index.html"
        if local.suffix == ".html" and local.is_file():
            text = local.read_text(encoding="utf-8")
            if self.mathjax is not None:
                text = MATHJAX_CDN.sub(OFFLINE_PREFIX + r"\1.js", text)
            return self._send_bytes(text.encode("utf-8"), "text/html; charset=utf-8")
        return super().send_head()

    def _send_bytes(self, data: bytes, ctype: str):
        import io

        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(data)


@pytest.fixture(scope="module")
def server(site):
    mathjax = _find_mathjax()
    handler = type("Handler", (_Handler,), {"mathjax": mathjax})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}/", "mathjax": mathjax}
    httpd.shutdown()
    httpd.server_close()


# ---- the browser ----------------------------------------------------------------------------------
ERROR_HOOK = r"""
window.__ddpmErrors = [];
window.addEventListener("error", function (e) {
  var t = e.target, url = t && (t.src || t.href);
  window.__ddpmErrors.push(url && !e.message ? {kind: "resource", url: String(url)}
                                          : {kind: "js", message: String(e.message), where: String(e.filename) + ":" + e.lineno});
}, true);
window.addEventListener("unhandledrejection", function (e) {
  window.__ddpmErrors.push({kind: "js", message: "unhandled rejection: " + String(e.reason && (e.reason.stack || e.reason))});
});
"""


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install selenium)")
    chrome = os.environ.get("CHROME_BIN") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver_path = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chrome or not driver_path:
        _missing("Chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download anything
    profile = tempfile.mkdtemp(prefix="ddpm-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000",
                "--hide-scrollbars", "--force-device-scale-factor=1",
                # offline: every host but this machine fails at once
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(90)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_HOOK})
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


REPORT: dict = {"pages": {}}


def _is_local(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname
    return host in {"127.0.0.1", "localhost"} or url.startswith(("data:", "blob:", "about:"))


def _load(driver, server, page: str) -> dict:
    """Open a page, wait for it and for MathJax; return its errors (local) and failed external loads."""
    driver.get_log("browser")  # drop what came before
    start = time.perf_counter()
    driver.get(server["url"] + page + ".html")
    mj = driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        const wait = (n) => {
          if (document.readyState !== "complete") { return setTimeout(() => wait(n), 50); }
          if (!window.MathJax || !MathJax.startup || !MathJax.startup.promise) {
            return n > 0 ? setTimeout(() => wait(n - 1), 100) : done("no MathJax");
          }
          MathJax.startup.promise.then(() => done("ok"), (e) => done("MathJax failed: " + e));
        };
        wait(20);""")
    seconds = time.perf_counter() - start
    hooked = driver.execute_script("return window.__ddpmErrors || []")
    errors, external = [], []
    for entry in driver.get_log("browser"):
        if entry.get("level") != "SEVERE":
            continue
        msg = entry.get("message", "")
        url = msg.split(" ", 1)[0]
        if urllib.parse.urlsplit(url).path == "/favicon.ico":
            continue  # the browser's own request; the site has no icon
        if entry.get("source") == "network" and url.startswith("http") and not _is_local(url):
            external.append(url)
        else:
            errors.append(msg)
    for e in hooked:
        if e.get("kind") == "resource" and not _is_local(e.get("url", "")):
            external.append(e["url"])
        elif e.get("kind") == "js" or e.get("kind") == "resource":
            errors.append(json.dumps(e))
    info = {"seconds": round(seconds, 2), "mathjax": mj, "errors": errors, "external_failed": sorted(set(external))}
    REPORT["pages"][page] = info
    return info


MATH_CHECK = r"""
const skip = "pre, code, script, style, textarea, .highlight, mjx-container, .ddpm-web";
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
let text = [];
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  if (n.parentElement && !n.parentElement.closest(skip)) { text.push(n.nodeValue); }
}
const maths = Array.from(document.querySelectorAll("span.math, div.math"));
return {
  text: text.join(" "),
  math: maths.length,
  unrendered: maths.filter(m => !m.querySelector("mjx-container")).map(m => m.textContent.slice(0, 80)),
  containers: document.querySelectorAll("mjx-container").length,
  merrors: Array.from(document.querySelectorAll("mjx-merror")).map(m => m.textContent.slice(0, 80)),
  widgets: Array.from(document.querySelectorAll("[data-ddpm-widget]")).map(w => ({
    id: w.id, kind: w.getAttribute("data-ddpm-widget"), ready: w.getAttribute("data-ready"),
    fallbackShown: !!(w.querySelector(".ddpm-fallback") && w.querySelector(".ddpm-fallback").offsetParent)})),
};
"""
RAW_TEX = re.compile(r"\$\$|\\begin\{|\\(frac|bar|mathbf|mathcal|sqrt|alpha|beta|epsilon|sigma|sum|prod|left|right)\b")


@pytest.mark.skipif(not PAGES, reason="no pages found (DDPM_SITE_DIR holds no site)")
@pytest.mark.parametrize("page", PAGES)
def test_page_loads_without_errors_and_its_maths_is_typeset(page, site, server, browser, shots):
    html = site / f"{page}.html"
    assert html.is_file(), f"{page}.html is in the table of contents but not in the site {site}"
    info = _load(browser, server, page)
    browser.save_screenshot(str(shots / f"{page.replace('/', '__')}.png"))
    assert not info["errors"], f"{page}: JavaScript errors:\n" + "\n".join(info["errors"])
    found = browser.execute_script(MATH_CHECK)
    REPORT["pages"][page].update(math=found["math"], mjx=found["containers"], widgets=len(found["widgets"]))
    raw = sorted({m.group(0) for m in RAW_TEX.finditer(found["text"])})
    if server["mathjax"] is None and found["math"]:
        _missing("a local MathJax 3 is needed to check the maths offline "
                 "(npm install --prefix ~/.cache/ddpm-book-web mathjax@3, or set DDPM_MATHJAX_DIR)")
    assert not raw, f"{page}: raw TeX left in the page text: {raw}"
    if found["math"]:
        assert info["mathjax"] == "ok", f"{page}: {info['mathjax']}"
        assert found["containers"] > 0 and not found["unrendered"], \
            f"{page}: maths not typeset: {found['unrendered'][:5]}"
    assert not found["merrors"], f"{page}: MathJax errors: {found['merrors'][:5]}"
    for w in found["widgets"]:
        assert w["ready"] == "1" and not w["fallbackShown"], f"{page}: the {w['kind']} figure {w['id']} did not start"


# ---- the interactive figures ----------------------------------------------------------------------
def _pages_with(site: Path, kind: str) -> list[str]:
    hits = []
    for p in sorted(site.rglob("*.html")):
        rel = p.relative_to(site)
        if rel.parts[0] in SKIP_DIRS:
            continue
        if f'data-ddpm-widget="{kind}"' in p.read_text(encoding="utf-8", errors="replace"):
            hits.append(str(rel.with_suffix("")))
    return sorted(hits, key=lambda name: ("schedul" not in name and "sampling" not in name, name))


def _library_alpha_bar(name, T, beta_start=None, beta_end=None):
    from ddpm_lib import GaussianDiffusion, make_beta_schedule

    opts = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
    return GaussianDiffusion(betas=make_beta_schedule(name, T, **opts)).alphas_cumprod.numpy()


def _state(driver, root_id):
    return driver.execute_script(
        "const r = document.getElementById(arguments[0]); const o = {};"
        "for (const a of r.attributes) { if (a.name.startsWith('data-')) o[a.name.slice(5)] = a.value; }"
        "o.abarPoints = document.getElementById(arguments[0] + '-abar-line').getAttribute('points');"
        "o.snrPoints = document.getElementById(arguments[0] + '-snr-line').getAttribute('points');"
        "o.xt = document.getElementById(arguments[0] + '-xt').toDataURL();"
        "return o;", root_id)


def _check_state_matches_library(state):
    name, T, t = state["schedule"], int(state["num-steps"]), int(state["t"])
    bs = float(state["beta-start"]) if state["beta-start"] else None
    be = float(state["beta-end"]) if state["beta-end"] else None
    ab = _library_alpha_bar(name, T, bs, be)
    got = float(state["alpha-bar-t"])
    assert abs(got - ab[t - 1]) <= 1e-12 * ab[t - 1], f"page alpha-bar_{t} = {got!r}, ddpm_lib {ab[t - 1]!r} ({state})"
    got_end = float(state["alpha-bar-end"])
    assert abs(got_end - ab[-1]) <= 1e-12 * ab[-1]


def _wait_for_redraw(driver, root_id, before: int, timeout=10.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        state = _state(driver, root_id)
        if int(state.get("draw-count", "0")) > before:
            return state
        time.sleep(0.05)
    raise AssertionError(f"the figure {root_id} did not redraw within {timeout} s")


def _set_by_event(driver, element_id, value):
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input', {bubbles: true})); e.dispatchEvent(new Event('change', {bubbles: true}));",
        element_id, str(value))


def _wait_for(driver, root_id, done, timeout=5.0) -> dict:
    """The figure's state once ``done(state)`` holds (or after ``timeout``: the caller asserts)."""
    end = time.time() + timeout
    state = _state(driver, root_id)
    while not done(state) and time.time() < end:
        time.sleep(0.05)
        state = _state(driver, root_id)
    return state


def _payload(driver, root_id) -> dict:
    """The JSON a figure embeds at build time (its ``<id>-data`` script element)."""
    return json.loads(driver.execute_script("return document.getElementById(arguments[0]).textContent",
                                            root_id + "-data"))


def _open_figure(driver, server, site, kind: str, chapter: str):
    """Load the first page holding a ``kind`` figure; return the page and the started figures on it."""
    from selenium.webdriver.common.by import By

    pages = _pages_with(site, kind)
    assert pages, f"no page of the site holds a ddpm_lib.web {kind} figure ({chapter} should)"
    info = _load(driver, server, pages[0])
    assert not info["errors"], info["errors"]
    roots = driver.find_elements(By.CSS_SELECTOR, f'[data-ddpm-widget="{kind}"]')
    assert roots and all(r.get_attribute("data-ready") == "1" for r in roots)
    return pages[0], roots


def test_schedule_sliders_redraw_and_equal_ddpm_lib(site, server, browser, shots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    page, roots = _open_figure(browser, server, site, "schedule-explorer", "chapter 7")

    # 1. the page's JavaScript against ddpm_lib, at the settings embedded when the page was built
    checked = 0
    for root in roots:
        rid = root.get_attribute("id")
        payload = _payload(browser, rid)
        page_values = browser.execute_script(
            "return arguments[0].map(r => { const ab = window.ddpmSchedule.alphaBar(r.name, r.T, r.beta_start,"
            " r.beta_end); return r.index.map(i => ab[i]); });", payload["reference"])
        for ref, got in zip(payload["reference"], page_values):
            np.testing.assert_allclose(got, ref["alpha_bar"], rtol=1e-12, atol=0,
                                       err_msg=f"page vs embedded ddpm_lib values at {ref['name']}, T={ref['T']}")
            lib = _library_alpha_bar(ref["name"], ref["T"], ref["beta_start"], ref["beta_end"])[ref["index"]]
            np.testing.assert_allclose(got, lib, rtol=1e-12, atol=0,
                                       err_msg=f"page vs this ddpm_lib at {ref['name']}, T={ref['T']}")
            checked += 1
    assert checked >= 4

    rid = roots[0].get_attribute("id")
    root = roots[0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", root)
    first = _state(browser, rid)
    _check_state_matches_library(first)

    # 2. T by an input event (as a script would move it)
    _set_by_event(browser, rid + "-T", 200)
    s = _wait_for_redraw(browser, rid, int(first["draw-count"]))
    assert s["num-steps"] == "200" and s["abarPoints"] != first["abarPoints"] and s["alpha-bar-end"] != first["alpha-bar-end"]
    _check_state_matches_library(s)

    # 3. the schedule menu, chosen as a reader would
    Select(browser.find_element(By.ID, rid + "-schedule")).select_by_value("cosine")
    s2 = _wait_for_redraw(browser, rid, int(s["draw-count"]))
    assert s2["schedule"] == "cosine" and s2["abarPoints"] != s["abarPoints"] and s2["beta-start"] == ""
    _check_state_matches_library(s2)

    # 4. T back to 1000 with the keyboard (3 steps of 10 to the right)
    t_slider = browser.find_element(By.ID, rid + "-T")
    ActionChains(browser).click(t_slider).perform()
    _set_by_event(browser, rid + "-T", 1000 - 10 * 3)
    t_slider.send_keys(Keys.ARROW_RIGHT * 3)
    s3 = _wait_for(browser, rid, lambda st: st["num-steps"] == "1000", timeout=10)
    assert s3["num-steps"] == "1000", s3["num-steps"]
    _check_state_matches_library(s3)

    # 5. the t slider dragged with the mouse, to about 60% of its track
    tt = browser.find_element(By.ID, rid + "-t")
    width = tt.size["width"]
    before = _state(browser, rid)
    ActionChains(browser).move_to_element_with_offset(tt, int(-width / 2 + 0.5 * width), 0).click_and_hold() \
        .move_by_offset(int(0.1 * width), 0).release().perform()
    _wait_for_redraw(browser, rid, int(before["draw-count"]))
    s4 = _wait_for(browser, rid, lambda st: st["t"] != before["t"])
    assert s4["t"] != before["t"] and 500 < int(s4["t"]) < 700, s4["t"]
    assert s4["alpha-bar-t"] != before["alpha-bar-t"] and s4["xt"] != before["xt"], "the noised image did not change"
    _check_state_matches_library(s4)

    # 6. the image: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with the embedded x0 and eps
    payload = _payload(browser, rid)
    ab = float(s4["alpha-bar-t"])
    x0, eps = np.array(payload["image"]["x0"]), np.array(payload["image"]["eps"])
    expected = float(np.sum(np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps))
    assert abs(float(s4["xt-sum"]) - expected) <= 1e-9 * max(1.0, abs(expected))

    # 7. a linear schedule with explicit ends: beta_T by the keyboard
    Select(browser.find_element(By.ID, rid + "-schedule")).select_by_value("linear")
    be = browser.find_element(By.ID, rid + "-beta-end")
    before = _state(browser, rid)
    be.send_keys(Keys.ARROW_LEFT * 2)
    s5 = _wait_for(browser, rid, lambda st: st["beta-end"] != before["beta-end"])
    assert s5["beta-end"] != before["beta-end"] and s5["abarPoints"] != before["abarPoints"]
    _check_state_matches_library(s5)

    # the picture for the book: cosine against the paper's dashed linear schedule, t moved by the mouse
    Select(browser.find_element(By.ID, rid + "-schedule")).select_by_value("cosine")
    _wait_for_redraw(browser, rid, int(s5["draw-count"]))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", root)
    time.sleep(0.2)
    path = shots / "schedule_after_slider.png"
    browser.save_screenshot(str(path))
    root.screenshot(str(shots / "schedule_after_slider_figure.png"))
    REPORT["schedule"] = {"page": page, "final_state": {k: v for k, v in _state(browser, rid).items()
                                                        if k not in ("abarPoints", "snrPoints", "xt")}}
    if os.environ.get("DDPM_UPDATE_FIGURES") == "1":
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, FIGURE)


def test_chain_slider_scrubs_the_reverse_chain(site, server, browser, shots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    page, roots = _open_figure(browser, server, site, "chain-scrubber", "chapter 8")
    root = roots[0]
    rid = root.get_attribute("id")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", root)
    frames = _payload(browser, rid)["frames"]
    assert len(frames) >= 2
    src = lambda: browser.find_element(By.ID, rid + "-xt").get_attribute("src")  # noqa: E731
    assert root.get_attribute("data-frame") == "0" and root.get_attribute("data-t") == str(frames[0]["t"])
    first_src = src()
    slider = browser.find_element(By.ID, rid + "-slider")
    width = slider.size["width"]
    ActionChains(browser).move_to_element(slider).click_and_hold().move_by_offset(int(0.2 * width), 0) \
        .release().perform()
    i = int(root.get_attribute("data-frame"))
    assert i > 0, "dragging the slider did not change the frame"
    assert root.get_attribute("data-t") == str(frames[i]["t"]) and src() == frames[i]["x_t"] != first_src
    x0_src = browser.find_element(By.ID, rid + "-x0").get_attribute("src")
    assert x0_src == frames[i]["pred_x0"]
    slider.send_keys(Keys.END)
    assert root.get_attribute("data-frame") == str(len(frames) - 1) and root.get_attribute("data-t") == str(frames[-1]["t"])
    browser.save_screenshot(str(shots / "chain_after_slider.png"))
    # the play button runs the chain from the start
    browser.find_element(By.ID, rid + "-play").click()
    time.sleep(0.6)
    assert 0 < int(root.get_attribute("data-frame")) < len(frames) - 1 or len(frames) < 6
    browser.find_element(By.ID, rid + "-play").click()
