"""config.load_config: defaults, environment, CLI overrides, and warnings for invalid values."""
import pytest

from tornado_gateway.config import (DEVELOPMENT, PRODUCTION, SETTINGS, FlaskConfig,
                                    GatewayConfig, default_python, load_config)


def load(env=None, overrides=None):
    warnings = []
    cfg = load_config(env or {}, overrides, warn=warnings.append)
    return cfg, warnings


def test_defaults_with_empty_environment():
    cfg, warnings = load({})
    assert warnings == []
    assert cfg == GatewayConfig()
    f = cfg.flask
    assert (f.script, f.host, f.port) == ("python/api_server.py", "127.0.0.1", 5001)
    assert (f.health_timeout, f.health_interval, f.health_retries) == (10000, 500, 10)
    assert f.shutdown_timeout == 5000 and f.unhealthy_after == 3 and f.auto_restart == 0
    assert f.python is None and f.url is None
    assert (cfg.host, cfg.port, cfg.max_body) == ("127.0.0.1", 8080, 1024 ** 3)
    assert cfg.mode == DEVELOPMENT and cfg.is_development and f.is_development
    assert f.base_url == "http://127.0.0.1:5001"


def test_valid_environment_values_are_used():
    cfg, warnings = load({
        "FLASK_PORT": " 6001 ", "FLASK_HOST": "localhost", "FLASK_HEALTH_TIMEOUT": "2000",
        "FLASK_HEALTH_INTERVAL": "100", "FLASK_HEALTH_RETRIES": "3", "FLASK_SHUTDOWN_TIMEOUT": "7",
        "FLASK_UNHEALTHY_AFTER": "2", "FLASK_SCRIPT": "srv/app.py", "FLASK_PYTHON": "/opt/py",
        "FLASK_AUTO_RESTART": "0", "GATEWAY_HOST": "0.0.0.0", "GATEWAY_PORT": "0",
        "GATEWAY_MAX_BODY": "4G", "GATEWAY_PROXY_TIMEOUT": "1", "GATEWAY_CONNECT_TIMEOUT": "9",
        "GATEWAY_READY_WAIT": "0"})
    assert warnings == []
    f = cfg.flask
    assert (f.port, f.host, f.health_timeout, f.health_interval, f.health_retries) == (
        6001, "localhost", 2000, 100, 3)
    assert (f.shutdown_timeout, f.unhealthy_after, f.script, f.python) == (7, 2, "srv/app.py",
                                                                            "/opt/py")
    assert (cfg.host, cfg.port, cfg.max_body, cfg.proxy_timeout) == ("0.0.0.0", 0, 4 * 1024 ** 3, 1)
    assert cfg.connect_timeout == 9 and cfg.ready_wait == 0


@pytest.mark.parametrize("var,bad,default,reason", [
    ("FLASK_PORT", "abc", 5001, "not a number"),
    ("FLASK_PORT", "0", 5001, "between 1 and 65535"),
    ("FLASK_PORT", "65536", 5001, "between 1 and 65535"),
    ("FLASK_PORT", "50.1", 5001, "not a number"),
    ("FLASK_HOST", "not a host!", "127.0.0.1", "not an IP address or host name"),
    ("FLASK_HOST", "-bad-.example", "127.0.0.1", "not an IP address or host name"),
    ("FLASK_HEALTH_TIMEOUT", "-5", 10000, "positive"),
    ("FLASK_HEALTH_TIMEOUT", "0", 10000, "positive"),
    ("FLASK_HEALTH_INTERVAL", "fast", 500, "not a number"),
    ("FLASK_HEALTH_RETRIES", "0", 10, "positive"),
    ("FLASK_SHUTDOWN_TIMEOUT", "1e3", 5000, "not a number"),
    ("FLASK_AUTO_RESTART", "-1", 0, "zero or a positive"),
    # so long it stops being a time: it would overflow the float seconds of the timers
    ("FLASK_HEALTH_INTERVAL", "9" * 400, 500, "at most 1000000000000 milliseconds"),
    ("FLASK_HEALTH_TIMEOUT", "1000000000001", 10000, "at most"),
    ("FLASK_SHUTDOWN_TIMEOUT", "9" * 4000, 5000, "at most"),
    ("GATEWAY_READY_WAIT", "9" * 400, 10000, "between 0 and 1000000000000"),
    ("GATEWAY_READY_WAIT", "-1", 10000, "between 0 and"),
    ("GATEWAY_PORT", "99999", 8080, "between 0 and 65535"),
    ("GATEWAY_MAX_BODY", "lots", 1024 ** 3, "byte count"),
    ("GATEWAY_MAX_BODY", "0", 1024 ** 3, "positive"),
    ("FLASK_URL", "ftp://x", "(none: spawn the workers)", "http://"),
    ("FLASK_URL", "http://127.0.0.1:5001/api", "(none: spawn the workers)", "root URL"),
    ("FLASK_URL", "http://127.0.0.1:99999", "(none: spawn the workers)", "invalid port"),
    ("FLASK_SCRIPT", "   ", "python/api_server.py", "must not be empty"),
])
def test_invalid_value_warns_with_variable_value_and_default(var, bad, default, reason):
    cfg, warnings = load({var: bad})
    assert len(warnings) == 1
    w = warnings[0]
    shown = default if str(default).startswith("(") else repr(default)  # words, or a value
    assert var in w and repr(bad) in w and shown in w and reason in w
    assert cfg == GatewayConfig()  # the default is used, nothing else changes


def test_invalid_values_warn_once_each_and_valid_ones_still_apply():
    cfg, warnings = load({"FLASK_PORT": "x", "FLASK_HOST": "::1", "FLASK_HEALTH_TIMEOUT": "-1",
                          "FLASK_HEALTH_INTERVAL": "250"})
    assert len(warnings) == 2
    assert any("FLASK_PORT" in w for w in warnings)
    assert any("FLASK_HEALTH_TIMEOUT" in w for w in warnings)
    assert cfg.flask.port == 5001 and cfg.flask.health_timeout == 10000
    assert cfg.flask.host == "::1" and cfg.flask.health_interval == 250
    assert cfg.flask.base_url == "http://[::1]:5001"


def test_empty_variable_is_missing_not_invalid():
    cfg, warnings = load({"FLASK_PORT": "", "FLASK_HOST": ""})
    assert warnings == [] and cfg.flask.port == 5001 and cfg.flask.host == "127.0.0.1"


def test_bracketed_ipv6_host_is_normalised():
    cfg, _ = load({"FLASK_HOST": "[::1]"})
    assert cfg.flask.host == "::1"


def test_override_wins_over_environment_and_none_means_not_given():
    cfg, warnings = load({"FLASK_PORT": "6000", "GATEWAY_PORT": "9000"},
                         {"flask_port": "7000", "port": None})
    assert warnings == []
    assert cfg.flask.port == 7000 and cfg.port == 9000


def test_invalid_override_names_the_option():
    cfg, warnings = load({"FLASK_PORT": "6000"}, {"flask_port": "nope"})
    assert len(warnings) == 1
    assert "--flask-port" in warnings[0] and "'nope'" in warnings[0] and "5001" in warnings[0]
    assert cfg.flask.port == 5001  # the bad override does not fall back to the environment


@pytest.mark.parametrize("env,mode", [
    ({}, DEVELOPMENT),
    ({"NODE_ENV": "production"}, PRODUCTION),
    ({"GATEWAY_ENV": "prod"}, PRODUCTION),
    ({"GATEWAY_ENV": "Production "}, PRODUCTION),
    ({"GATEWAY_ENV": "development", "NODE_ENV": "production"}, DEVELOPMENT),
    ({"NODE_ENV": "test"}, DEVELOPMENT),
])
def test_mode_from_environment(env, mode):
    cfg, warnings = load(env)
    assert warnings == []
    assert cfg.mode == mode and cfg.flask.mode == mode
    assert cfg.is_development is (mode == DEVELOPMENT)


def test_mode_override():
    cfg, _ = load({"NODE_ENV": "development"}, {"mode": "production"})
    assert cfg.mode == PRODUCTION and not cfg.flask.is_development


def test_flask_url_sets_host_and_port_for_external_server():
    cfg, warnings = load({"FLASK_URL": "http://10.1.2.3:7000/"})
    assert warnings == []
    assert cfg.flask.url == "http://10.1.2.3:7000"
    assert (cfg.flask.host, cfg.flask.port) == ("10.1.2.3", 7000)
    assert cfg.flask.base_url == "http://10.1.2.3:7000"
    cfg, _ = load({"FLASK_URL": "http://svc"})
    assert cfg.flask.port == 80


def test_default_comes_from_environ_argument_not_process(monkeypatch):
    monkeypatch.setenv("FLASK_PORT", "6123")
    assert load_config({}, warn=lambda m: None).flask.port == 5001
    assert load_config(None, warn=lambda m: None).flask.port == 6123


def test_default_warn_goes_to_the_config_logger(caplog):
    with caplog.at_level("WARNING", logger="tornado_gateway.config"):
        load_config({"FLASK_PORT": "zz"})
    assert any("FLASK_PORT" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


def test_every_setting_has_an_env_variable_and_option():
    for name, setting in SETTINGS.items():
        assert setting.env.isupper() and setting.option.startswith("--")
        assert callable(setting.parse) and setting.where in ("gateway", "flask")
        assert setting.meaning and setting.metavar


def test_default_python_is_own_interpreter():
    import sys

    assert default_python() == sys.executable
    assert FlaskConfig(url="http://h:1/").base_url == "http://h:1"


@pytest.mark.parametrize("host,url", [
    ("0.0.0.0", "http://127.0.0.1:5001"),
    ("::", "http://[::1]:5001"),
    ("10.0.0.5", "http://10.0.0.5:5001"),
    ("localhost", "http://localhost:5001"),
])
def test_base_url_never_targets_a_wildcard_address(host, url):
    # the child may bind every interface, but the gateway connects to one address; Windows
    # refuses connections to 0.0.0.0
    cfg, warnings = load({"FLASK_HOST": host})
    assert warnings == [] and cfg.flask.host == host
    assert cfg.flask.base_url == url


def test_huge_times_do_not_crash_the_bridge():
    from tornado_gateway.supervisor.bridge import PythonBridge

    cfg, warnings = load({var: "9" * 400 for var in (
        "FLASK_HEALTH_INTERVAL", "FLASK_HEALTH_TIMEOUT", "FLASK_SHUTDOWN_TIMEOUT")})
    assert len(warnings) == 3
    PythonBridge(cfg, control=object())  # used to raise OverflowError
    cfg, warnings = load({"FLASK_HEALTH_INTERVAL": "1000000000000"})
    assert warnings == [] and cfg.flask.health_interval == 10 ** 12


# --- workers and dispatch ------------------------------------------------------------------

def test_worker_count_defaults_by_mode(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert load({})[0].flask.worker_count == 1
    assert load({"GATEWAY_ENV": "production"})[0].flask.worker_count == 6
    assert load({"GATEWAY_ENV": "production", "FLASK_WORKERS": "3"})[0].flask.worker_count == 3
    assert load({}, {"workers": "4"})[0].flask.worker_count == 4


@pytest.mark.parametrize("raw", ["0", "-1", "two", "65", ""])
def test_invalid_worker_counts_warn_and_use_the_default(raw):
    cfg, warnings = load({"FLASK_WORKERS": raw})
    assert cfg.flask.workers is None and cfg.flask.worker_count == 1
    assert len(warnings) == (0 if raw == "" else 1)
    if raw:
        assert "FLASK_WORKERS" in warnings[0]


def test_workers_past_the_last_port_are_cut_with_a_warning():
    cfg, warnings = load({"FLASK_PORT": "65534", "FLASK_WORKERS": "4"})
    assert cfg.flask.worker_count == 2 and len(warnings) == 1 and "65534" in warnings[0]


def test_dispatch_settings():
    cfg, warnings = load({"GATEWAY_WORKER_LIMIT": "3", "GATEWAY_QUEUE_LIMIT": "0",
                          "GATEWAY_QUEUE_TIMEOUT": "1500"})
    assert warnings == []
    assert (cfg.worker_limit, cfg.queue_limit, cfg.queue_timeout) == (3, 0, 1500)
    cfg, warnings = load({"GATEWAY_WORKER_LIMIT": "0", "GATEWAY_QUEUE_LIMIT": "-2",
                          "GATEWAY_QUEUE_TIMEOUT": "0"})
    assert len(warnings) == 3
    assert (cfg.worker_limit, cfg.queue_limit, cfg.queue_timeout) == (2, 256, 30000)


def test_flask_url_may_list_several_servers():
    cfg, warnings = load({"FLASK_URL": "http://127.0.0.1:7001/, http://10.0.0.2:7002"})
    assert warnings == []
    f = cfg.flask
    assert f.url == "http://127.0.0.1:7001" and f.urls == ("http://127.0.0.1:7001",
                                                          "http://10.0.0.2:7002")
    assert f.worker_count == 2 and f.base_url == "http://127.0.0.1:7001"
    from tornado_gateway.config import worker_config
    second = worker_config(f, 1)
    assert (second.url, second.host, second.port, second.base_url) == (
        "http://10.0.0.2:7002", "10.0.0.2", 7002, "http://10.0.0.2:7002")


@pytest.mark.parametrize("raw", ["http://a:1,http://a:1", "http://a:1,ftp://b", ",", "http://a:1,x"])
def test_bad_url_lists_warn_and_spawn_instead(raw):
    cfg, warnings = load({"FLASK_URL": raw})
    assert cfg.flask.url is None and cfg.flask.urls == () and len(warnings) == 1


def test_worker_config_gives_each_spawned_worker_its_port():
    from tornado_gateway.config import worker_config
    f = load({"FLASK_WORKERS": "2", "FLASK_PORT": "6000"})[0].flask
    assert [worker_config(f, i).base_url for i in range(2)] == [
        "http://127.0.0.1:6000", "http://127.0.0.1:6001"]


# --- one table: --help, the README, and refusing bad flags ----------------------------------

def test_readme_configuration_table_is_the_settings_table():
    import os

    from tornado_gateway.config import settings_table
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    with open(readme, encoding="utf-8") as f:
        assert settings_table() in f.read(), (
            "README's configuration table differs from tornado_gateway.config.SETTINGS; "
            "paste settings_table() into it")


def test_help_shows_meaning_default_unit_and_variable_of_every_setting(capsys):
    from tornado_gateway.__main__ import build_parser
    from tornado_gateway.config import describe_default
    text = " ".join(build_parser().format_help().split())
    for name, setting in SETTINGS.items():
        assert setting.option in text and "[%s]" % setting.env in text
        assert "%s (default: %s)" % (" ".join(setting.meaning.split()),
                                     describe_default(name)) in text
    assert "(default: 300000 ms) [GATEWAY_PROXY_TIMEOUT]" in text


@pytest.mark.parametrize("argv,complaint", [
    (["--port", "abc"], "argument --port: invalid value 'abc': not a number"),
    (["--port", "70000"], "a port must be between 0 and 65535"),
    (["--workers", "0"], "argument --workers: invalid value '0'"),
    (["--max-body", "lots"], "must be a byte count"),
    (["--flask-url", "ftp://x"], "must be an http:// URL"),
    (["--mode", "prod"], "invalid choice: 'prod'"),
])
def test_a_bad_flag_exits_2_with_the_usage_line(argv, complaint, capsys):
    from tornado_gateway.__main__ import main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tornado-gateway") and complaint in err, err


def test_a_bad_environment_variable_still_only_warns():
    cfg, warnings = load({"GATEWAY_PORT": "abc"})
    assert cfg.port == 8080 and len(warnings) == 1


# --- the event loop: asyncio (default) or uvloop --------------------------------------------

def test_loop_defaults_to_asyncio_and_takes_uvloop_where_it_runs(monkeypatch):
    from tornado_gateway import config

    monkeypatch.setattr(config, "uvloop_problem", lambda: None)  # as if installed
    assert load({})[0].loop == "asyncio"
    cfg, warnings = load({"GATEWAY_LOOP": " UVLoop "})
    assert cfg.loop == "uvloop" and warnings == []
    assert load({"GATEWAY_LOOP": "uvloop"}, {"loop": "asyncio"})[0].loop == "asyncio"


def test_loop_unknown_name_warns_and_uses_asyncio():
    cfg, warnings = load({"GATEWAY_LOOP": "tokio"})
    assert cfg.loop == "asyncio"
    assert warnings == ["Invalid GATEWAY_LOOP='tokio' (must be 'asyncio' or 'uvloop'); using "
                        "the default 'asyncio'."]


def test_uvloop_from_the_environment_where_it_is_missing_warns_and_uses_asyncio(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    cfg, warnings = load({"GATEWAY_LOOP": "uvloop"})
    assert cfg.loop == "asyncio" and len(warnings) == 1
    assert warnings[0].startswith("Invalid GATEWAY_LOOP='uvloop' (uvloop is not installed")
    assert "pip install uvloop, or use asyncio" in warnings[0]
    assert warnings[0].endswith("using the default 'asyncio'.")


def test_uvloop_problem_per_platform():
    from tornado_gateway.config import uvloop_problem

    def missing(name):
        raise ImportError("No module named %r" % name)

    assert uvloop_problem("win32", lambda name: None) == (
        "uvloop does not run on Windows; use asyncio")
    assert uvloop_problem("linux", lambda name: None) is None
    assert uvloop_problem("darwin", missing).startswith("uvloop is not installed")


def test_uvloop_flag_where_it_is_missing_exits_2(monkeypatch, capsys):
    import sys

    from tornado_gateway.__main__ import main
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(SystemExit) as info:
        main(["--loop", "uvloop"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tornado-gateway")
    assert "argument --loop: invalid value 'uvloop': uvloop is not installed" in err, err


def test_unknown_loop_flag_exits_2(capsys):
    from tornado_gateway.__main__ import main
    with pytest.raises(SystemExit) as info:
        main(["--loop", "trio"])
    assert info.value.code == 2
    assert "argument --loop: invalid value 'trio': must be 'asyncio' or 'uvloop'" in (
        capsys.readouterr().err)
