"""ddpm_lib.web: the static-page figures. Their HTML, their embedded reference values, and (with
Node.js) the page's JavaScript schedules against ddpm_lib to 1e-12 relative."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from ddpm_lib import GaussianDiffusion, make_beta_schedule
from ddpm_lib import web

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js is not installed (apt-get install nodejs)")


def _library_alpha_bar(name, T, beta_start=None, beta_end=None):
    opts = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
    return GaussianDiffusion(betas=make_beta_schedule(name, T, **opts)).alphas_cumprod.numpy()


def _json_blocks(html):
    return [json.loads(m) for m in re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', html, re.S)]


def _scripts(html):
    return re.findall(r"<script>(.*?)</script>", html, re.S)


def _ids(html):
    return re.findall(r'\bid="([^"]+)"', html)


@pytest.fixture(scope="module")
def image():
    return torch.linspace(-1, 1, 64).reshape(1, 8, 8)


@pytest.fixture(scope="module")
def explorer(image):
    return web.schedule_explorer(image=image)


@pytest.fixture(scope="module")
def scrubber():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, 1, 8, 8, generator=g)
    return web.chain_scrubber(x, x.clamp(-1, 1) * 0.5, list(range(29, -1, -1)), max_frames=10)


def test_explorer_embeds_library_reference_values(explorer):
    (payload,) = _json_blocks(explorer.data)
    assert payload == json.loads(json.dumps(explorer.payload))
    refs = payload["reference"]
    assert {r["name"] for r in refs} == {"linear", "cosine", "quadratic", "sigmoid"}
    for r in refs:
        ab = _library_alpha_bar(r["name"], r["T"], r["beta_start"], r["beta_end"])
        assert r["index"][0] == 0 and r["index"][-1] == r["T"] - 1
        assert r["alpha_bar"] == [float(ab[i]) for i in r["index"]]  # exact: JSON keeps float64 repr


def test_explorer_embeds_image_and_seeded_noise(explorer, image):
    img = explorer.payload["image"]
    assert (img["channels"], img["height"], img["width"]) == (1, 8, 8)
    np.testing.assert_allclose(img["x0"], image.reshape(-1).numpy(), atol=1e-6)
    eps = np.random.default_rng(img["seed"]).standard_normal((1, 8, 8)).reshape(-1)
    np.testing.assert_allclose(img["eps"], eps, atol=1e-6)


def test_ids_are_unique_within_and_across_figures(image, scrubber):
    a, b = web.schedule_explorer(image=image), web.schedule_explorer(image=image)
    ids_a, ids_b, ids_c = _ids(a.data), _ids(b.data), _ids(scrubber.data)
    for ids in (ids_a, ids_b, ids_c):
        assert len(ids) == len(set(ids))
    assert not set(ids_a) & set(ids_b) and not set(ids_a) & set(ids_c)
    assert all(i.startswith(a.element_id) for i in ids_a)
    # the scripts address elements only through their own figure's id
    assert a.element_id in _scripts(a.data)[-1] and b.element_id not in a.data


def test_html_is_self_contained(explorer, scrubber):
    for fig in (explorer, scrubber):
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", fig.data), "no external resources (offline)"
        assert "$" not in fig.data, "no dollar signs: MathJax must not touch the figure"
        assert fig._repr_html_() is fig.data
        assert 'data-ddpm-widget="' in fig.data


def test_scrubber_frames_in_sampling_order_with_paper_labels(scrubber):
    (payload,) = _json_blocks(scrubber.data)
    ts = [f["t"] for f in payload["frames"]]
    assert ts[0] == 30 and ts[-1] == 1 and ts == sorted(ts, reverse=True) and len(ts) == 10
    assert all(f["x_t"].startswith("data:image/png;base64,") for f in payload["frames"])
    assert len({f["x_t"] for f in payload["frames"]}) == len(ts)  # each frame its own picture


def test_scrubber_accepts_ddpm_sample_chain_and_quadratic_spacing():
    d = GaussianDiffusion(num_timesteps=100)
    x, chain = __import__("ddpm_lib").ddpm_sample(lambda x, t: torch.zeros_like(x), d, (2, 1, 4, 4),
                                                   generator=torch.Generator().manual_seed(0), progress=False,
                                                   return_intermediates=True, record_every=1, device="cpu")
    fig = web.chain_scrubber(chain["x_t"], chain["pred_x0"], chain["t"], max_frames=12, spacing="quadratic")
    ts = [f["t"] for f in fig.payload["frames"]]
    assert ts[0] == 100 and ts[-1] == 1
    assert ts[-2] - ts[-1] <= ts[0] - ts[1]  # denser towards t = 1


@pytest.mark.parametrize("bad", [
    dict(schedules=("linear", "nope")), dict(schedule="cosine", schedules=("linear",)), dict(T=15),
    dict(T=100, t=101), dict(beta_end=1.5), dict(image=torch.zeros(2, 8, 8)), dict(image=torch.zeros(100, 100)),
])
def test_explorer_rejects_bad_arguments(bad, image):
    kwargs = {"image": image, **bad}
    with pytest.raises((ValueError, TypeError)):
        web.schedule_explorer(**kwargs)


def test_scrubber_rejects_bad_arguments():
    x = torch.zeros(3, 1, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        web.chain_scrubber(x, torch.zeros(3, 1, 4, 5), [2, 1, 0])
    with pytest.raises(ValueError, match="timesteps"):
        web.chain_scrubber(x, x, [1, 0])
    with pytest.raises(ValueError, match="spacing"):
        web.chain_scrubber(x, x, [2, 1, 0], spacing="log")


def test_beta_ladders_hold_the_papers_values():
    assert "1e-4" in web.BETA_START_VALUES and float(web.BETA_START_VALUES[0]) == 1e-5
    assert "2e-2" in web.BETA_END_VALUES and float("2e-2") == 0.02
    assert float(web.BETA_END_VALUES[-1]) == 0.5


def test_save_writes_a_standalone_page(tmp_path, scrubber):
    page = scrubber.save(tmp_path / "x.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and scrubber.element_id in page


# ---- the JavaScript, run by Node.js ----------------------------------------------------------------
SETTINGS = [
    ("linear", 1000, None, None), ("linear", 1000, 1e-4, 0.02), ("linear", 10, 1e-4, 0.02), ("linear", 37, None, None),
    ("linear", 2000, 1e-5, 0.5), ("cosine", 1000, None, None), ("cosine", 50, None, None), ("cosine", 1, None, None),
    ("quadratic", 1000, None, None), ("quadratic", 200, 1e-5, 0.3), ("sigmoid", 1000, None, None),
    ("sigmoid", 300, 1e-5, 0.05), ("linear", 1, 0.5, 0.5), ("sigmoid", 100, 0.02, 1e-4),
]


def _node(script, timeout=60):
    out = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


@needs_node
def test_every_script_parses(explorer, scrubber, tmp_path):
    for k, fig in enumerate((explorer, scrubber)):
        for i, src in enumerate(_scripts(fig.data)):
            path = tmp_path / f"s{k}_{i}.js"
            path.write_text(src)
            out = subprocess.run([NODE, "--check", str(path)], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr


@needs_node
def test_javascript_schedules_equal_ddpm_lib():
    calls = ",".join(
        "[%s, %s, %s, %s]" % (json.dumps(n), T, json.dumps(bs), json.dumps(be)) for n, T, bs, be in SETTINGS)
    out = _node(web.SCHEDULE_JS + """
        const S = globalThis.ddpmSchedule;
        const res = [%s].map(([n, T, bs, be]) => ({betas: S.betas(n, T, bs, be), abar: S.alphaBar(n, T, bs, be),
                                                    snr: S.logSnr(n, T, bs, be)}));
        process.stdout.write(JSON.stringify(res));""" % calls)
    for (name, T, bs, be), got in zip(SETTINGS, json.loads(out)):
        opts = {k: v for k, v in (("beta_start", bs), ("beta_end", be)) if v is not None}
        betas = make_beta_schedule(name, T, **opts).numpy()
        ab = _library_alpha_bar(name, T, bs, be)
        snr = np.log(ab) - np.log1p(-ab)
        np.testing.assert_allclose(got["betas"], betas, rtol=1e-12, atol=0, err_msg=f"betas {name} T={T}")
        np.testing.assert_allclose(got["abar"], ab, rtol=1e-12, atol=0, err_msg=f"alpha-bar {name} T={T}")
        np.testing.assert_allclose(got["snr"], snr, rtol=1e-12, atol=1e-12, err_msg=f"log-SNR {name} T={T}")


@needs_node
def test_javascript_matches_the_embedded_reference(explorer):
    refs = explorer.payload["reference"]
    out = _node(web.SCHEDULE_JS + """
        const refs = %s;
        process.stdout.write(JSON.stringify(refs.map(r => globalThis.ddpmSchedule.alphaBar(r.name, r.T,
            r.beta_start, r.beta_end)).map((ab, k) => refs[k].index.map(i => ab[i]))));""" % json.dumps(refs))
    for r, got in zip(refs, json.loads(out)):
        np.testing.assert_allclose(got, r["alpha_bar"], rtol=1e-12, atol=0)


@needs_node
def test_javascript_rejects_what_the_library_rejects():
    out = _node(web.SCHEDULE_JS + """
        const S = globalThis.ddpmSchedule, res = [];
        for (const args of [["linear", 10, null, null], ["nope", 10, null, null], ["linear", 0, 1e-4, 0.02],
                            ["linear", 2.5, 1e-4, 0.02]]) {
          try { S.betas(...args); res.push("ok"); } catch (e) { res.push("error"); }
        }
        process.stdout.write(JSON.stringify(res));""")
    assert json.loads(out) == ["error"] * 4
    with pytest.raises(ValueError):
        make_beta_schedule("linear", 10)  # the scaled default ends give beta >= 1 there too


def test_the_initial_t_fits_a_short_chain(image):
    """The default t is the chain's middle, so any T works without passing t."""
    fig = web.schedule_explorer(image=image, T=100)
    assert re.search(r'-t" type="range" min="1" max="100" step="1" value="50"', fig.data)
    with pytest.raises(ValueError, match="1..T=100"):
        web.schedule_explorer(image=image, T=100, t=500)
