"""Fixes for the web book's HTML that the browser test (tests/test_site.py) found.

* sphinx-thebe 0.3 (with Sphinx 7) adds its configuration script to every page twice, and the second
  copy throws "Identifier 'THEBE_JS_URL' has already been declared": each script now appears once.
* Chapter titles with maths appear in the navigation of every page, but Sphinx loads MathJax only
  on pages whose body has maths (the references page showed raw TeX): MathJax is on every page.
* The pydata theme logs "Got invalid theme mode" on a reader's first visit unless a default mode
  is set: it is "auto" (follow the reader's system), unless _config.yml sets html_context.default_mode.
"""


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for js in context.get("script_files") or []:
        key = (str(getattr(js, "filename", js) or ""), tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:  # the first occurrence wins; the order is kept
            seen.add(key)
            kept.append(js)
    if "script_files" in context:
        context["script_files"] = kept


def _default_mode(app, config):
    config.html_context = {"default_mode": "auto", **(config.html_context or {})}


def setup(app):
    app.set_html_assets_policy("always")  # MathJax (and other assets) on every page
    app.connect("config-inited", _default_mode)
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
