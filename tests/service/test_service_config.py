"""Settings from the environment, and the parent watch's judgement of a process."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import psutil

from deepfake import parent_watch
from deepfake.config import DEFAULT_DATA_DIR, load_config, mode_from


def test_mode_follows_gateway_env_then_node_env() -> None:
    assert mode_from({}) == "development"
    assert mode_from({"NODE_ENV": "production"}) == "production"
    assert mode_from({"GATEWAY_ENV": "development", "NODE_ENV": "production"}) == "development"
    assert mode_from({"GATEWAY_ENV": " Production "}) == "production"
    assert mode_from({"GATEWAY_ENV": "staging"}) == "development"


def test_environment_values_and_bad_values_fall_back(caplog) -> None:
    config = load_config({"DEEPFAKE_MAX_UPLOAD": "1000", "DEEPFAKE_MAX_PIXELS": "lots",
                          "DEEPFAKE_STORE_IMAGES": "yes", "DEEPFAKE_DATA_DIR": "rel/dir"})
    assert config.max_upload == 1000 and config.max_pixels == 50_000_000
    assert config.store_images is True and config.data_dir == os.path.abspath("rel/dir")
    assert "DEEPFAKE_MAX_PIXELS='lots'" in caplog.text
    assert load_config({}).data_dir == DEFAULT_DATA_DIR
    assert DEFAULT_DATA_DIR.endswith(os.path.join("python", "data"))
    assert load_config({}, data_dir="/x/y", env="production").env == "production"


def test_parent_watch_sees_a_live_a_dead_and_a_recycled_pid() -> None:
    me = psutil.Process()
    assert parent_watch._alive(me.pid, me.create_time())
    assert not parent_watch._alive(me.pid, me.create_time() - 100)  # same PID, other process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not parent_watch._alive(child.pid, None)


def test_watch_calls_back_once_the_process_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    gone = threading.Event()
    try:
        parent_watch.watch_parent(child.pid, on_gone=gone.set, interval=0.05)
        assert not gone.wait(0.3)
        child.kill()
        child.wait()
        assert gone.wait(5)
    finally:
        child.kill()
        child.wait()
    assert parent_watch.watch_from_environment({"TORNADO_GATEWAY_PID": "abc"}) is None
    assert parent_watch.watch_from_environment({}) is None


def test_the_service_reads_the_mode_as_the_gateway_does() -> None:
    """One rule, two packages: every GATEWAY_ENV value means the same mode to both."""
    from tornado_gateway.config import load_config as gateway_config

    from deepfake.config import mode_from

    for raw in ("production", "prod", "PROD", " Production ", "development", "dev", "staging",
                "", "productions"):
        gateway = gateway_config({"GATEWAY_ENV": raw}).mode if raw else "development"
        assert mode_from({"GATEWAY_ENV": raw}) == gateway, raw
