"""The README's embedding example, run as a user would: a real program, a real child."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read())


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_embed_example_serves_own_routes_and_the_proxy_then_stops_the_child():
    port, flask_port = free_port(), free_port()
    env = dict(os.environ, GATEWAY_PORT=str(port), FLASK_PORT=str(flask_port),
               FLASK_SCRIPT=os.path.join(ROOT, "tests", "child_scripts", "echo_server.py"))
    # started as a script's background job would be: with SIGINT ignored (it must stop anyway)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "embed.py")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, body = get("http://127.0.0.1:%d/hello" % port)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
                assert time.monotonic() < deadline, "the example never listened"
                time.sleep(0.1)
        assert (status, body) == (200, {"hello": "from my own app"})
        status, body = get("http://127.0.0.1:%d/api/deepfake/stats" % port)
        assert status == 200 and body["model_loaded"] is True
        status, body = get("http://127.0.0.1:%d/api/gateway/status" % port)
        child_pid = body["service"]["pid"]
        assert body["service"]["state"] == "ready" and psutil.pid_exists(child_pid)

        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        output = proc.stdout.read().decode(errors="replace")
        # the example sets up logging: its user sees the child's lines and the gateway's
        assert "[Python] " in output and "Started the Flask server" in output, output
        deadline = time.monotonic() + 5
        while psutil.pid_exists(child_pid) and time.monotonic() < deadline:
            try:
                if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        alive = psutil.pid_exists(child_pid) and \
            psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
        assert not alive, "the child outlived the embedding program"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_the_readme_shows_the_embedding_example_as_it_is():
    with open(os.path.join(ROOT, "examples", "embed.py"), encoding="utf-8") as f:
        example = f.read()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    program = example[example.index("import asyncio"):].rstrip()
    assert "```python\n" + program + "\n```" in readme, (
        "README's embedding snippet differs from examples/embed.py")
