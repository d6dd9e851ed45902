"""An application that embeds the gateway installs it without the service's ML stack.

A fresh virtual environment gets the gateway's distribution alone (`pip install <repo>`):
it imports, it has none of numpy, scipy, scikit-learn, Pillow or Flask, and
`python -m tornado_gateway` starts, serves its page and status, and reports the child's
missing dependencies with the documented fix (`pip install -e ./python`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from ports import free_port

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def gateway_only_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway-only")
    venv = str(root / "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120)
    python = os.path.join(venv, "bin", "python")
    done = subprocess.run([python, "-m", "pip", "install", "-q", REPO], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return python


@pytest.mark.timeout(900)
def test_the_gateway_alone_installs_without_the_ml_stack_and_imports(gateway_only_venv):
    probe = ("import importlib.util, json, tornado_gateway\n"
             "from tornado_gateway import GatewayHTTPServer, PythonBridge, make_app\n"
             "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in\n"
             "  ('numpy', 'scipy', 'sklearn', 'PIL', 'flask', 'waitress', 'deepfake',\n"
             "   'tornado', 'httptools', 'psutil')}))\n")
    done = subprocess.run([gateway_only_venv, "-c", probe], capture_output=True, text=True,
                          cwd="/", timeout=60)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert {m for m, there in found.items() if there} == {"tornado", "httptools", "psutil"}


@pytest.mark.timeout(300)
def test_without_the_service_it_serves_and_says_how_to_install_it(gateway_only_venv, tmp_path):
    port, flask_port = free_port(), free_port()
    log_path = tmp_path / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "FLASK_"))}
    env.update(GATEWAY_PORT=str(port), FLASK_PORT=str(flask_port), PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([gateway_only_venv, "-m", "tornado_gateway"], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        status = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/api/gateway/status" % port,
                                            timeout=5) as resp:
                    status = json.loads(resp.read())
                if status["service"]["state"] in ("exited", "failed"):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert status is not None and status["service"]["state"] in ("exited", "failed"), status
        with urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5) as page:
            assert page.status == 200  # the page is served
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen("http://127.0.0.1:%d/api/deepfake/stats" % port, timeout=5)
        assert refused.value.code == 503
        assert json.loads(refused.value.read())["error"] == "Flask server unavailable"
        log = log_path.read_text(errors="replace")
        assert "ModuleNotFoundError: No module named" in log, log[-3000:]
        assert "pip install -e ./python" in log, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                assert proc.wait(30) == 0
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
