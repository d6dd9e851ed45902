"""The web page at ``/``, driven in headless Debian Chromium against a real gateway + real child.

What it checks, as a person would: the status badge says the service is ready; an image picked
with the file input uploads with a progress bar and shows a verdict, probability, warnings,
elapsed time and the spectrum chart; "This is fake" asks for confirmation and the training
count goes up; Retrain shows the service's 409 message; drag and drop works; the page fits a
375 px phone screen and the file picker is reachable with the keyboard; the resampling signal
(an image enlarged 1.5x) is shown found, with its score against its threshold, beside the
spectral one; against a gateway that requires a token (``GATEWAY_AUTH=token``), the page takes
it from ``/?token=...`` (and cleans the address bar) or asks for it with a form, keeps it for
the tab's session and sends it with every API call, never elsewhere; an open gateway asks for
nothing; and after the child is SIGKILLed the badge and the page say "Service unavailable"
with how to fix it.

The browser is Debian's ``/usr/bin/chromium`` (``apt-get install chromium``), driven by the
Python ``playwright`` package; nothing is downloaded. Where it is missing the tests say so
loudly and skip; set ``BROWSER_TEST_REQUIRED=1`` (CI) to make that a failure instead.
Screenshots and the gateway's log go to ``test-output/browser/`` (gitignored).

Run: ``python -m pytest tests/browser -v``
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups are used to kill the child"),
]

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "test-output" / "browser"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}
READY_TIMEOUT_S = 90
UI_TIMEOUT_MS = 30_000
VERDICT_TITLES = {"Declared AI-generated", "Declared a camera capture", "Up-sampling traces found",
                  "No up-sampling traces found", "Can't tell"}


# ------------------------------------------------------------------------------ availability

def _browser_problem() -> Optional[str]:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return "the Python package 'playwright' is not installed (%s); pip install playwright" % exc
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return ("no Chromium at %s; install Debian's with: apt-get update && apt-get install -y "
                "chromium (or set CHROMIUM_PATH)" % CHROMIUM)
    return None


def _skip_loudly(problem: str) -> None:
    banner = "\n" + "!" * 78 + "\n!! BROWSER TEST NOT RUN: " + problem + "\n" + "!" * 78 + "\n"
    sys.stderr.write(banner)
    warnings.warn("browser test not run: " + problem)
    summary = _browser_conftest()
    if summary is not None and hasattr(summary, "NOT_RUN"):
        summary.NOT_RUN.append(problem)
    if os.environ.get("BROWSER_TEST_REQUIRED", "").strip() not in ("", "0", "false", "no"):
        pytest.fail("BROWSER_TEST_REQUIRED is set but " + problem, pytrace=False)
    pytest.skip("BROWSER TEST NOT RUN: " + problem)


def _browser_conftest() -> Any:
    """tests/browser/conftest.py as pytest loaded it (its module name depends on rootdir)."""
    here = str(Path(__file__).with_name("conftest.py"))
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) == here:
            return module
    return None


# ------------------------------------------------------------------------------ helpers

from ports import free_port as _free_port  # noqa: E402  (never the same port twice)


def _get_json(url: str, timeout: float = 5.0, token: Optional[str] = None) -> Dict[str, Any]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:  # error bodies are JSON too
        return json.loads(exc.read().decode("utf-8"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_images(folder: Path) -> Dict[str, Path]:
    """Photo-like test images, made here instead of committed: PNG (large, for the progress
    bar), JPEG (for drag and drop and the phone)."""
    import numpy as np
    from PIL import Image

    try:
        import skimage.data

        photo = np.asarray(skimage.data.astronaut())  # 512x512 RGB photograph
        other = np.asarray(skimage.data.coffee())  # 400x600 RGB photograph
    except Exception:  # no scikit-image: a textured synthetic scene is enough for the page
        rng = np.random.default_rng(7)
        y, x = np.mgrid[0:512, 0:512]
        base = (np.sin(x / 23.0) + np.cos(y / 17.0)) * 50 + 128
        photo = np.clip(base[..., None] + rng.normal(0, 18, (512, 512, 3)), 0, 255).astype(np.uint8)
        other = photo[:400, :, ::-1].copy()
    # tiled, never resampled: a big file whose pixels still look like a camera photo
    big = np.tile(photo, (4, 4, 1))
    paths = {"large_png": folder / "astronaut_tiled_2048.png", "jpeg": folder / "coffee.jpg"}
    Image.fromarray(big).save(paths["large_png"], compress_level=1)
    Image.fromarray(other).save(paths["jpeg"], quality=92)
    # distinct images to label for a retrain: camera crops ("real") and 2x enlarged crops ("fake")
    for i in range(6):
        top, left = 32 * i, 40 * i
        real = photo[top:top + 256, left:left + 256] if i % 2 else other[top:top + 256, left:left + 256]
        paths["real%d" % i] = folder / ("real%d.png" % i)
        Image.fromarray(np.ascontiguousarray(real)).save(paths["real%d" % i])
        small = Image.fromarray(np.ascontiguousarray(real[:160, :160]))
        paths["fake%d" % i] = folder / ("fake%d.png" % i)
        small.resize((320, 320), Image.BILINEAR if i % 2 else Image.NEAREST).save(paths["fake%d" % i])
    return paths


# ------------------------------------------------------------------------------ fixtures

class Gateway:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path,
                 token: Optional[str] = None) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.base = "http://127.0.0.1:%d" % port
        self.child_pids: List[int] = []
        self.token = token  # the API token it requires (None: open)

    def status(self) -> Dict[str, Any]:
        return _get_json(self.base + "/api/gateway/status", token=self.token)

    def stats(self) -> Dict[str, Any]:
        return _get_json(self.base + "/api/deepfake/stats", token=self.token)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("the gateway exited with %s before the service was ready:\n%s"
                                     % (self.proc.returncode, self.log_tail()))
            try:
                last = self.status()
                if (last.get("service") or {}).get("state") == "ready":
                    pid = last["service"].get("pid")
                    if isinstance(pid, int) and pid not in self.child_pids:
                        self.child_pids.append(pid)
                    return last
            except (OSError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.25)
        raise AssertionError("service not ready after %ss; last status %r\n%s"
                             % (timeout, last, self.log_tail()))


@pytest.fixture(scope="module")
def browser_available() -> None:
    problem = _browser_problem()
    if problem:
        _skip_loudly(problem)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    return _make_images(tmp_path_factory.mktemp("browser-images"))


def _run_gateway(tmp_path_factory: pytest.TempPathFactory, log_name: str,
                 token: Optional[str] = None) -> Iterator[Gateway]:
    """A real gateway + child on free loopback ports; with ``token``, one that requires it
    (``GATEWAY_AUTH=token``, ``GATEWAY_TOKEN``); without, open (the loopback default)."""
    OUT.mkdir(parents=True, exist_ok=True)
    data_dir = tmp_path_factory.mktemp("deepfake-data")
    port = _free_port()
    flask_port = _free_port()
    while flask_port == port:
        flask_port = _free_port()
    env = dict(os.environ, DEEPFAKE_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    for var in ("GATEWAY_PORT", "FLASK_PORT", "FLASK_URL", "FLASK_AUTO_RESTART",
                "GATEWAY_AUTH", "GATEWAY_TOKEN", "GATEWAY_TOKEN_FILE"):
        env.pop(var, None)  # the command line below decides; no restart, so the kill shows
    if token is not None:
        env.update(GATEWAY_AUTH="token", GATEWAY_TOKEN=token)
    log_path = OUT / log_name
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tornado_gateway", "--port", str(port), "--flask-port", str(flask_port)],
        cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)  # its own group: a Ctrl+C in this terminal is not sent twice
    gw = Gateway(proc, port, log_path, token)
    try:
        gw.wait_ready()
        yield gw
    finally:
        _stop_gateway(gw)
        log.close()


@pytest.fixture(scope="module")
def gateway(browser_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    yield from _run_gateway(tmp_path_factory, "gateway.log")


@pytest.fixture(scope="module")
def token_gateway(browser_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway that requires a token, as one listening beyond loopback does."""
    yield from _run_gateway(tmp_path_factory, "gateway-token.log", token=secrets.token_urlsafe(24))


def _stop_gateway(gw: Gateway) -> None:
    """SIGINT the gateway we started and wait; kill only what we started if it hangs."""
    proc = gw.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sys.stderr.write("gateway did not exit 30 s after SIGINT; killing its group\n")
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: its group is its pid
            proc.wait(timeout=10)
    for pid in gw.child_pids:  # a child the gateway failed to reap would hold the port
        if _alive(pid):
            sys.stderr.write("child %d outlived the gateway; killing its group\n" % pid)
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def browser(browser_available: None) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class PageErrors:
    def __init__(self) -> None:
        self.errors: List[str] = []

    def check(self) -> None:
        assert not self.errors, "JavaScript errors on the page: %r" % self.errors


def _open(browser: Any, gw: Gateway, viewport: Dict[str, int]) -> Tuple[Any, PageErrors]:
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(UI_TIMEOUT_MS)
    errs = PageErrors()
    page.on("pageerror", lambda exc: errs.errors.append(str(exc)))
    page.goto(gw.base + "/?poll=500")  # poll fast so state changes show within a second
    return page, errs


def _shot(page: Any, name: str, full_page: bool = True) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(OUT / (name + ".png")), full_page=full_page)


def _wait_result(page: Any, previous_id: Optional[str] = None) -> str:
    page.wait_for_selector("#result-body:not([hidden]), #result-error:not([hidden])")
    assert page.is_hidden("#result-error"), "analysis failed: " + page.inner_text("#result-error")
    if previous_id is not None:
        page.wait_for_function(
            "prev => { const d = document.querySelector('[data-field=analysis-id]');"
            " return d && d.textContent !== prev; }", arg=previous_id)
    return page.inner_text("[data-field=analysis-id]")


def _check_result(page: Any) -> None:
    assert page.inner_text("#verdict-title") in VERDICT_TITLES
    assert "%" in page.inner_text("#prob-text")
    assert page.get_attribute("#prob-meter", "aria-valuenow") is not None
    elapsed = page.inner_text("[data-field=elapsed]")
    assert "ms" in elapsed or " s" in elapsed, elapsed
    assert page.inner_text("#explanation").strip()
    # the chart is drawn by the page: an SVG with one curve point per spectrum value
    assert page.is_visible("#spectrum-chart svg path.curve")
    assert page.locator("#spectrum-chart svg circle.pt").count() >= 2
    assert page.inner_text("#result-facts").count("—") <= 1  # real fields, not placeholders
    # both kinds of evidence, each under its own heading
    assert page.is_visible("#provenance-block") and page.is_visible("#signal-block")
    assert page.inner_text("#provenance-summary").strip()
    assert "Spectral signal" in page.inner_text("#signal-summary")
    # never "generated by AI" from the spectral signal alone
    if page.inner_text("#verdict-title") != "Declared AI-generated":
        assert "by AI" not in page.inner_text("#verdict")


# ------------------------------------------------------------------------------ tests

@pytest.mark.timeout(300)
def test_upload_verdict_feedback_retrain(gateway: Gateway, browser: Any, images: Dict[str, Path]) -> None:
    page, errs = _open(browser, gateway, DESKTOP)
    page.wait_for_selector("#status-badge[data-state=ready]")
    assert "Service ready" in page.inner_text("#status-badge")
    assert page.is_hidden("#unavailable")
    stats = gateway.stats()
    page.wait_for_function("() => document.getElementById('count-total').textContent !== '—'")
    capabilities = stats.get("capabilities")
    if capabilities:  # the service's own sentence on what it can and cannot detect
        assert page.inner_text("#capabilities") == capabilities
    fake_before = int((stats.get("samples_per_label") or {}).get("fake", 0))
    assert page.inner_text("#count-fake") == str(fake_before)
    _shot(page, "01-desktop-ready")

    # upload with the real file input, throttled so the progress bar is visible
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 20, "downloadThroughput": -1,
        "uploadThroughput": 1024 * 1024})  # ~2 s for the 2 MB PNG
    page.set_input_files("#file-input", str(images["large_png"]))
    page.wait_for_selector("#preview-img[src^='blob:']")
    page.wait_for_selector("#upload-progress:not([hidden])")
    page.wait_for_function("() => document.getElementById('upload-bar').value > 0")
    _shot(page, "02-desktop-uploading", full_page=False)
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    first_id = _wait_result(page)
    _check_result(page)
    assert page.is_hidden("#upload-progress")
    _shot(page, "03-desktop-result")

    # feedback: confirm first, then the count changes on the page (and in the service)
    page.click("#fb-fake")
    page.wait_for_selector("#fb-confirm:not([hidden])")
    assert "FAKE" in page.inner_text("#fb-confirm-text")
    page.click("#fb-no")  # cancel sends nothing
    assert page.is_hidden("#fb-confirm")
    assert page.inner_text("#count-fake") == str(fake_before)
    page.click("#fb-fake")
    page.click("#fb-yes")
    ok = page.wait_for_selector("[data-testid=feedback-ok]")
    assert "saved" in ok.inner_text().lower()
    page.wait_for_function("n => document.getElementById('count-fake').textContent === String(n)",
                           arg=fake_before + 1)
    assert int((gateway.stats().get("samples_per_label") or {}).get("fake", -1)) == fake_before + 1
    _shot(page, "04-desktop-feedback")

    # retrain with too few samples: the service's 409 message and suggestion are shown
    page.click("#retrain")
    page.wait_for_selector("[data-testid=retrain-error], [data-testid=retrain-outcome]",
                           timeout=120_000)
    if page.locator("[data-testid=retrain-error]").count():
        text = page.inner_text("[data-testid=retrain-error]")
        assert "What to do" in text
        assert "Still needed" in text or "sample" in text.lower(), text
    assert page.is_enabled("#retrain")
    _shot(page, "05-desktop-retrain")

    # drag and drop a JPEG onto the drop zone
    data = base64.b64encode(images["jpeg"].read_bytes()).decode("ascii")
    page.evaluate("""([b64, name]) => {
        const bin = atob(b64); const buf = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) buf[i] = bin.charCodeAt(i);
        const dt = new DataTransfer();
        dt.items.add(new File([buf], name, {type: 'image/jpeg'}));
        const zone = document.getElementById('dropzone');
        for (const type of ['dragenter', 'dragover', 'drop'])
            zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [data, images["jpeg"].name])
    _wait_result(page, previous_id=first_id)
    _check_result(page)
    assert images["jpeg"].name in page.inner_text("#preview-caption")
    errs.check()
    page.close()


@pytest.mark.timeout(240)
def test_phone_width_and_keyboard(gateway: Gateway, browser: Any, images: Dict[str, Path]) -> None:
    page, errs = _open(browser, gateway, PHONE)
    page.wait_for_selector("#status-badge[data-state=ready]")
    # the file picker is reachable with Tab (the real input, visually replaced by its label)
    reached = False
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == "file-input":
            reached = True
            break
    assert reached, "the file input is not reachable with the keyboard"
    # every control has an accessible name
    unnamed = page.evaluate("""() => [...document.querySelectorAll('button, input, progress')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                     && !(e.textContent || '').trim())
        .map(e => e.id || e.outerHTML.slice(0, 60))""")
    assert unnamed == [], unnamed
    page.set_input_files("#file-input", str(images["jpeg"]))
    _wait_result(page)
    _check_result(page)
    page.click("#fb-real")
    page.wait_for_selector("#fb-confirm:not([hidden])")
    assert page.evaluate("document.activeElement.id") == "fb-yes"  # focus moves to the question
    page.keyboard.press("Escape")
    assert page.is_hidden("#fb-confirm")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], "the page scrolls sideways at 375 px (%d px wide)" % width
    _shot(page, "06-phone-result")
    errs.check()
    page.close()


@pytest.mark.timeout(300)
def test_retrain_shows_outcome(gateway: Gateway, browser: Any, images: Dict[str, Path]) -> None:
    page, errs = _open(browser, gateway, DESKTOP)
    page.wait_for_selector("#status-badge[data-state=ready]")
    needed = int((gateway.stats().get("retrain") or {}).get("min_feedback_per_label") or 5)
    for label in ("real", "fake"):  # label enough distinct images through the gateway's API
        for i in range(min(needed, 6)):
            path = images["%s%d" % (label, i)]
            resp = page.request.post(gateway.base + "/api/deepfake/feedback", multipart={
                "label": label,
                "file": {"name": path.name, "mimeType": "image/png", "buffer": path.read_bytes()}})
            assert resp.status == 201, resp.text()
    page.click("#stats-refresh")
    per = gateway.stats().get("samples_per_label") or {}
    page.wait_for_function("n => document.getElementById('count-real').textContent === String(n)",
                           arg=per.get("real"))
    page.click("#retrain")
    page.wait_for_selector("#retrain-progress:not([hidden])")
    assert page.is_disabled("#retrain")
    _shot(page, "10-desktop-retraining", full_page=False)
    outcome = page.wait_for_selector("[data-testid=retrain-outcome], [data-testid=retrain-error]",
                                     timeout=240_000)
    text = outcome.inner_text()
    assert page.locator("[data-testid=retrain-outcome]").count() == 1, text
    assert "New model in use" in text or "current model was kept" in text, text
    version = (gateway.stats().get("model") or {}).get("version")
    if "New model in use" in text:
        assert str(version) in text
        page.wait_for_function("v => document.querySelector('[data-field=model-version]').textContent === v",
                               arg=str(version))
    assert page.is_enabled("#retrain") and page.is_hidden("#retrain-progress")
    outcome.scroll_into_view_if_needed()
    _shot(page, "11-desktop-retrain-outcome")
    errs.check()
    page.close()


@pytest.mark.timeout(240)
def test_the_page_shows_provenance_and_signal_apart(gateway: Gateway, browser: Any,
                                                    images: Dict[str, Path]) -> None:
    """A PNG that carries a generator's settings chunk (built here with Pillow) is answered
    "Declared AI-generated" with the chunk named under Provenance, and the spectral signal
    still shown under its own heading; a plain photo gets "none found, absence proves
    nothing"."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a lighthouse at dusk\nSteps: 30, Sampler: Euler a, CFG scale: 7, "
                                "Seed: 1234, Size: 512x512")
    declared = images["real1"].with_name("declared.png")
    Image.open(images["real1"]).save(declared, pnginfo=info)
    page, errs = _open(browser, gateway, DESKTOP)
    page.wait_for_selector("#status-badge[data-state=ready]")
    page.set_input_files("#file-input", str(declared))
    first = _wait_result(page)
    _check_result(page)
    assert page.inner_text("#verdict-title") == "Declared AI-generated"
    assert "generation settings" in page.inner_text("#verdict-sub")
    items = page.inner_text("#provenance-items")
    assert "PNG text chunk 'parameters'" in items and "Steps" in items
    assert "Spectral signal" in page.inner_text("#signal-summary")
    _shot(page, "12-desktop-provenance")
    page.set_input_files("#file-input", str(images["real0"]))
    _wait_result(page, previous_id=first)
    assert "Absence proves nothing" in page.inner_text("#provenance-summary")
    assert page.is_hidden("#provenance-items")
    assert page.inner_text("#verdict-title") != "Declared AI-generated"
    errs.check()
    page.close()


@pytest.mark.timeout(240)
def test_page_survives_odd_responses(gateway: Gateway, browser: Any, images: Dict[str, Path]) -> None:
    """Fields missing, unknown values, HTML error pages, an unreachable gateway: the page shows
    "—" or a plain message and never throws. The API is faked here with page.route; the page
    itself is the one the real gateway serves."""
    answers: Dict[str, Any] = {
        "status": (200, {"service": {"state": "starting"}}),
        "stats": (200, {"model": None, "samples_per_label": {}, "retrain": None}),
        "analyze": (200, {"verdict": "something_new", "spectrum": {"log_magnitude": [1, "x", None]}}),
    }

    def handler(name: str) -> Any:
        def fulfil(route: Any) -> None:
            status, body = answers[name]
            if body is None:
                route.abort("connectionrefused")
            elif isinstance(body, str):
                route.fulfill(status=status, body=body, content_type="text/html")
            else:
                route.fulfill(status=status, body=json.dumps(body), content_type="application/json")
        return fulfil

    page = browser.new_page(viewport=PHONE)
    page.set_default_timeout(UI_TIMEOUT_MS)
    errs = PageErrors()
    page.on("pageerror", lambda exc: errs.errors.append(str(exc)))
    page.route("**/api/gateway/status", handler("status"))
    page.route("**/api/deepfake/stats", handler("stats"))
    page.route("**/api/deepfake/analyze", handler("analyze"))
    page.goto(gateway.base + "/?poll=300")

    page.wait_for_selector("#status-badge[data-state=starting]")
    assert "unavailable" in page.inner_text("#status-badge").lower()
    assert page.is_visible("#unavailable")
    assert "starting" in page.inner_text("#unavailable-what")
    page.wait_for_function("() => document.querySelector('[data-field=model-version]')")
    assert page.inner_text("[data-field=model-version]") == "—"
    assert page.inner_text("#count-real") == "—"
    assert page.inner_text("#capabilities").strip()  # the page's own fallback sentence

    page.set_input_files("#file-input", str(images["jpeg"]))
    page.wait_for_selector("#result-body:not([hidden])")
    assert page.inner_text("#verdict-title") == "something new"
    assert "no score" in page.inner_text("#prob-text")
    assert page.inner_text("[data-field=elapsed]").startswith("—")
    assert page.is_hidden("#spectrum-panel")  # fewer than two usable points: no chart
    assert page.is_hidden("#feedback-panel")  # no analysis_id: nothing to label

    answers["analyze"] = (502, "<html><body>Bad Gateway</body></html>")
    page.set_input_files("#file-input", str(images["jpeg"]))
    page.wait_for_selector("#result-error:not([hidden])")
    assert "not available" in page.inner_text("#result-error")

    answers["analyze"] = (413, {"error": "Too large", "message": "The upload is 60 MB; the limit is 50 MB.",
                                "suggestion": "Send a smaller image.", "timestamp": "2024-01-01T00:00:00Z"})
    page.set_input_files("#file-input", str(images["jpeg"]))
    page.wait_for_function("() => document.getElementById('result-error').textContent.includes('60 MB')")
    assert "Send a smaller image." in page.inner_text("#result-error")

    answers["status"] = (200, None)  # the gateway itself is gone
    page.wait_for_selector("#status-badge[data-state=gateway-unreachable]")
    assert "cannot reach the gateway" in page.inner_text("#unavailable")
    answers["status"] = (200, {"service": {"state": "ready", "ready": True}})
    page.wait_for_selector("#status-badge[data-state=ready]")
    assert page.is_hidden("#unavailable")
    # several workers, one down: still serving, and the badge says how many are
    answers["status"] = (200, {"service": {"state": "ready", "ready": True, "workers": [
        {"state": "ready"}, {"state": "exited"}]}})
    page.wait_for_selector("#status-badge.badge-warn")
    assert "1 of 2 workers" in page.inner_text("#status-badge")
    assert page.is_hidden("#unavailable")
    errs.check()
    page.close()


@pytest.mark.timeout(240)
def test_resampling_signal_shown_beside_the_spectral_one(gateway: Gateway, browser: Any,
                                                          images: Dict[str, Path]) -> None:
    """A camera crop enlarged 1.5x (built here with Pillow: a factor the spectral model cannot
    see) shows the resampling signal "Found", its score against its threshold and why, under
    Signal next to the spectral signal; the crop itself shows "Not found", and an image too
    small to examine "Inconclusive" with the service's reason."""
    from PIL import Image

    crop = Image.open(images["real0"]).convert("RGB")  # 256 x 256, never resized
    enlarged = images["real0"].with_name("enlarged_1_5x.png")
    crop.resize((crop.width * 3 // 2, crop.height * 3 // 2), Image.BICUBIC).save(enlarged)
    tiny = images["real0"].with_name("tiny_100.png")
    crop.crop((0, 0, 100, 100)).save(tiny)

    page, errs = _open(browser, gateway, DESKTOP)
    page.wait_for_selector("#status-badge[data-state=ready]")
    page.set_input_files("#file-input", str(enlarged))
    first = _wait_result(page)
    _check_result(page)
    signal_block = page.inner_text("#signal-block")
    assert "Spectral signal" in signal_block and "Resampling signal" in signal_block
    assert page.get_attribute("#resampling", "data-status") == "traces_found"
    assert page.inner_text("#resampling-status") == "Found"
    summary = page.inner_text("#resampling-summary")
    assert "traces found" in summary and "threshold of" in summary, summary
    assert "not generated" in summary  # resized is not "generated by AI"
    assert page.is_visible("#resampling-meter")
    now = float(page.get_attribute("#resampling-meter", "aria-valuenow"))
    top = float(page.get_attribute("#resampling-meter", "aria-valuemax"))
    assert now >= top / 2, (now, top)  # at or above the threshold, drawn in the middle
    assert "threshold" in page.get_attribute("#resampling-meter", "aria-valuetext")
    assert "threshold" in page.inner_text("[data-field=resampling-score]")
    assert page.inner_text("#verdict-title") != "Declared AI-generated"
    page.locator("#signal-block").scroll_into_view_if_needed()
    _shot(page, "13-desktop-resampling-found")

    page.set_input_files("#file-input", str(images["real0"]))
    second = _wait_result(page, previous_id=first)
    assert page.get_attribute("#resampling", "data-status") == "no_traces_found"
    assert page.inner_text("#resampling-status") == "Not found"
    assert "below the threshold" in page.inner_text("#resampling-summary")

    page.set_input_files("#file-input", str(tiny))
    _wait_result(page, previous_id=second)
    assert page.get_attribute("#resampling", "data-status") == "inconclusive"
    assert page.inner_text("#resampling-status") == "Inconclusive"
    assert "too small" in page.inner_text("#resampling-summary")
    assert page.is_hidden("#resampling-meter")  # no score: nothing to draw
    errs.check()
    page.close()


# ------------------------------------------------------------------------------ the API token

class Watch:
    """What a page sent to the API, and what it wrote to the console."""

    def __init__(self, page: Any) -> None:
        self.requests: List[Any] = []
        self.console: List[str] = []
        self.errors = PageErrors()
        page.on("request", lambda req: self.requests.append(req))
        page.on("console", lambda msg: self.console.append(msg.text))
        page.on("pageerror", lambda exc: self.errors.errors.append(str(exc)))

    def api_calls(self) -> List[Tuple[str, str, Optional[str]]]:
        """(method, path, Authorization) of every /api/ request, as the browser sent it."""
        calls = []
        for req in self.requests:
            path = urllib.parse.urlsplit(req.url).path
            if path.startswith("/api/"):
                calls.append((req.method, path, req.all_headers().get("authorization")))
        return calls


def _token_page(context: Any, gw: Gateway, url_suffix: str = "/?poll=500") -> Tuple[Any, Watch]:
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    watch = Watch(page)
    page.goto(gw.base + url_suffix)
    return page, watch


def _full_status(page: Any) -> None:
    """The badge carries what only the full status says (the service's uptime): the status
    poll carried the token."""
    page.wait_for_selector("#status-badge[data-state=ready][title^='Running for']")


def _never_leaks(gw: Gateway, watch: Watch, page: Any) -> None:
    token = gw.token
    assert token
    assert token not in page.url
    assert not [m for m in watch.console if token in m], "the token was written to the console"
    for req in watch.requests:
        assert req.url.startswith(gw.base + "/") or req.url.startswith(("data:", "blob:")), \
            "a request left the gateway: " + req.url
        if req.resource_type != "document":  # only the navigation that brought it may carry it
            assert token not in req.url, req.url


@pytest.mark.timeout(240)
def test_token_from_the_url(token_gateway: Gateway, browser: Any, images: Dict[str, Path]) -> None:
    """Opened with /?token=...: the token leaves the address bar, stays in the tab's
    sessionStorage, and every /api/ call (status, stats, analyze, feedback, retrain) carries
    Authorization: Bearer <token>; no form is shown."""
    gw = token_gateway
    assert gw.token
    reduced = _get_json(gw.base + "/api/gateway/status")  # no token: the reduced status
    assert (reduced.get("auth") or {}).get("required") is True, reduced
    context = browser.new_context(viewport=DESKTOP)
    try:
        page, watch = _token_page(context, gw, "/?poll=500&token=" + urllib.parse.quote(gw.token))
        page.wait_for_function("() => !location.search.includes('token')")
        assert page.url == gw.base + "/?poll=500"  # the other parameters kept
        assert page.evaluate("() => Object.values(sessionStorage)") == [gw.token]
        _full_status(page)
        assert page.is_hidden("#token-panel")
        page.wait_for_function("() => document.getElementById('count-total').textContent !== '—'")
        assert page.is_hidden("#stats-error")

        page.set_input_files("#file-input", str(images["jpeg"]))
        _wait_result(page)
        _check_result(page)
        page.click("#fb-real")
        page.click("#fb-yes")
        page.wait_for_selector("[data-testid=feedback-ok]")
        page.click("#retrain")
        outcome = page.wait_for_selector("[data-testid=retrain-error], [data-testid=retrain-outcome]",
                                         timeout=120_000)
        assert "token" not in outcome.inner_text().lower(), outcome.inner_text()
        assert page.is_hidden("#token-panel")
        _shot(page, "14-desktop-token-from-url")

        calls = watch.api_calls()
        paths = {path for _, path, _ in calls}
        assert {"/api/gateway/status", "/api/deepfake/stats", "/api/deepfake/analyze",
                "/api/deepfake/feedback", "/api/deepfake/retrain"} <= paths, paths
        without = [(m, p) for m, p, auth in calls if auth != "Bearer " + gw.token]
        assert without == [], "API calls without the token: %r" % without
        _never_leaks(gw, watch, page)
        watch.errors.check()
    finally:
        context.close()


@pytest.mark.timeout(300)
def test_token_form(token_gateway: Gateway, browser: Any, images: Dict[str, Path]) -> None:
    """Opened without the token: an accessible form asks for it; a wrong one is refused with a
    message; the right one is kept for the tab (a reload does not ask again, a new browser
    context does); a 401 later (the token changed where the gateway runs) asks again, and the
    analysis that got it is sent again with the new token."""
    gw = token_gateway
    assert gw.token
    context = browser.new_context(viewport=PHONE)
    try:
        page, watch = _token_page(context, gw)
        page.wait_for_selector("#token-panel:not([hidden])")
        assert page.evaluate("document.activeElement.id") == "token-input"  # asked, focused
        assert page.get_attribute("#token-input", "type") == "password"
        label = page.evaluate("() => [...document.getElementById('token-input').labels]"
                              ".map(l => l.textContent.trim())")
        assert label == ["Access token"], label
        assert page.locator("#token-form button[type=submit]").count() == 1
        assert page.is_hidden("#token-error")
        page.wait_for_selector("#status-badge[data-state=ready]")  # the reduced status says so
        assert page.inner_text("#count-total") == "—"  # nothing asked of the API without it
        _shot(page, "15-phone-token-form", full_page=False)

        page.fill("#token-input", "not-the-token")
        page.press("#token-input", "Enter")
        page.wait_for_selector("#token-error:not([hidden])")
        assert "did not accept" in page.inner_text("#token-error")
        assert page.evaluate("document.activeElement.id") == "token-input"
        assert page.is_visible("#token-panel")
        assert page.evaluate("() => sessionStorage.length") == 0
        _shot(page, "16-phone-token-refused", full_page=False)

        page.fill("#token-input", gw.token)
        page.click("#token-submit")
        page.wait_for_selector("#token-panel", state="hidden")
        _full_status(page)
        page.wait_for_function("() => document.getElementById('count-total').textContent !== '—'")
        page.set_input_files("#file-input", str(images["jpeg"]))
        first = _wait_result(page)
        _check_result(page)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], "the page scrolls sideways at 375 px (%d px wide)" % width

        page.reload()  # the tab's session keeps it
        _full_status(page)
        page.wait_for_function("() => document.getElementById('count-total').textContent !== '—'")
        assert page.is_hidden("#token-panel")

        # the token changed where the gateway runs: the next analysis gets a 401
        def stale(route: Any) -> None:
            headers = dict(route.request.all_headers())
            headers["authorization"] = "Bearer an-old-token"
            route.continue_(headers=headers)

        page.route("**/api/deepfake/analyze", stale)
        page.set_input_files("#file-input", str(images["real1"]))
        page.wait_for_selector("#token-panel:not([hidden])")
        assert "does not accept the token this tab had" in page.inner_text("#token-why")
        assert "Waiting for the access token" in page.inner_text("#result-empty")
        page.unroute("**/api/deepfake/analyze", stale)
        page.fill("#token-input", gw.token)
        page.click("#token-submit")
        page.wait_for_selector("#token-panel", state="hidden")
        _wait_result(page, previous_id=first)  # the same image, sent again with the token
        assert images["real1"].name in page.inner_text("#preview-caption")
        _never_leaks(gw, watch, page)
        watch.errors.check()

        # a new browser context is a new session: asked again
        other = browser.new_context(viewport=DESKTOP)
        try:
            fresh, fresh_watch = _token_page(other, gw)
            fresh.wait_for_selector("#token-panel:not([hidden])")
            assert fresh.evaluate("() => sessionStorage.length") == 0
            # a stale token kept by the tab: the status poll's reduced answer asks again
            fresh.evaluate("() => sessionStorage.setItem('tornado_gateway.api_token', 'stale')")
            fresh.reload()
            fresh.wait_for_function("() => !document.getElementById('token-panel').hidden && "
                                    "document.getElementById('token-why').textContent"
                                    ".includes('does not accept the token this tab had')")
            assert fresh.evaluate("() => sessionStorage.length") == 0  # the stale one dropped
            fresh_watch.errors.check()
        finally:
            other.close()
    finally:
        context.close()


@pytest.mark.timeout(120)
def test_open_gateway_asks_for_nothing(gateway: Gateway, browser: Any) -> None:
    """The loopback default is open: no form, no token stored, none sent."""
    context = browser.new_context(viewport=DESKTOP)
    try:
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        watch = Watch(page)
        page.goto(gateway.base + "/?poll=300")
        page.wait_for_selector("#status-badge[data-state=ready][title^='Running for']")
        page.wait_for_function("() => document.getElementById('count-total').textContent !== '—'")
        page.wait_for_timeout(1000)  # a few more polls
        assert page.is_hidden("#token-panel")
        assert page.evaluate("() => sessionStorage.length") == 0
        assert [c for c in watch.api_calls() if c[2] is not None] == []
        watch.errors.check()
    finally:
        context.close()


@pytest.mark.timeout(240)
def test_unavailable_message_after_child_killed(gateway: Gateway, browser: Any, images: Dict[str, Path]) -> None:
    """Last in the file: it kills the gateway's child."""
    status = gateway.wait_ready()
    desktop, desktop_errs = _open(browser, gateway, DESKTOP)
    phone, phone_errs = _open(browser, gateway, PHONE)
    for page in (desktop, phone):
        page.wait_for_selector("#status-badge[data-state=ready]")

    pid = status["service"]["pid"]
    assert isinstance(pid, int) and pid > 0, status
    os.killpg(os.getpgid(pid), signal.SIGKILL)  # the child runs in its own session/group

    for page in (desktop, phone):
        page.wait_for_selector("#unavailable:not([hidden])")
        page.wait_for_function(
            "() => !['ready', 'unknown'].includes(document.getElementById('status-badge').dataset.state)")
        assert "Service unavailable" in page.inner_text("#status-badge")
        panel = page.inner_text("#unavailable")
        assert "Service unavailable" in panel and "How to fix" in panel
        service_message = (gateway.status().get("service") or {}).get("message")
        if service_message:
            page.wait_for_function(
                "m => document.getElementById('unavailable-message').textContent === m",
                arg=service_message)
    _shot(desktop, "07-desktop-unavailable")
    _shot(phone, "08-phone-unavailable", full_page=False)

    # an upload now shows the gateway's 503 message and suggestion, not a silent failure
    desktop.set_input_files("#file-input", str(images["jpeg"]))
    desktop.wait_for_selector("#result-error:not([hidden])")
    text = desktop.inner_text("#result-error")
    assert "What to do" in text, text
    _shot(desktop, "09-desktop-upload-while-down")
    for page, errs in ((desktop, desktop_errs), (phone, phone_errs)):
        errs.check()
        page.close()
