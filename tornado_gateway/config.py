"""Settings: defaults, environment parsing, CLI overrides, and warnings for invalid values.

This module is the one place that decides every default. ``load_config(environ, overrides)``
never raises for a bad value: it logs one warning naming the variable, the bad value and the
default it used instead, and carries on (design property 8).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import ipaddress
import logging
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

log = logging.getLogger("tornado_gateway.config")

DEVELOPMENT = "development"
PRODUCTION = "production"


@dataclass(frozen=True)
class FlaskConfig:
    """How to run (or reach) the Flask child and how to watch it. Times in milliseconds."""

    script: str = "python/api_server.py"
    host: str = "127.0.0.1"
    port: int = 5001
    health_timeout: int = 10000
    health_interval: int = 500
    health_retries: int = 10
    unhealthy_after: int = 3
    shutdown_timeout: int = 5000
    python: Optional[str] = None
    url: Optional[str] = None  # external Flask: spawn nothing, proxy here
    auto_restart: int = 0  # how many times an exited child is restarted; 0 = never
    mode: str = DEVELOPMENT
    workers: Optional[int] = None  # worker processes; None: 1 in development, CPUs in production
    urls: Tuple[str, ...] = ()  # every external server when FLASK_URL lists several

    @property
    def worker_count(self) -> int:
        """How many workers the group runs: one per external URL; else ``workers``, or by
        default 1 in development (one debug server to read) and one per CPU in production
        (analyze is CPU-bound: one process per core is what uses the machine)."""
        if self.url:
            return max(1, len(self.urls))
        if self.workers is not None:
            return self.workers
        return 1 if self.is_development else max(1, os.cpu_count() or 1)

    @property
    def is_development(self) -> bool:
        return self.mode != PRODUCTION

    @functools.cached_property
    def base_url(self) -> str:  # read on every proxied request; the config is frozen
        if self.url:
            return self.url.rstrip("/")
        # the child binds FLASK_HOST; the gateway connects to it. A wildcard bind address is
        # not a destination (Windows refuses to connect to 0.0.0.0): use the loopback instead
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:  # IPv6 literal
            host = "[%s]" % host
        return "http://%s:%d" % (host, self.port)


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway's own settings, with the child's beside them."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_body: int = 1024 ** 3  # 1 GiB; raise for bigger uploads
    proxy_timeout: int = 300000  # whole proxied exchange, ms
    connect_timeout: int = 5000
    ready_wait: int = 10000  # how long a request that arrives while starting waits
    upstream: str = "keepalive"  # HTTP client to the child: "keepalive" pool or "simple"
    idle_timeout: int = 60000  # idle keep-alive connection, and the whole request head, ms
    body_timeout: int = 60000  # a request body that stalls this long is refused, ms
    # Dispatch to the workers. In flight per worker: 2 keeps a CPU-bound worker busy (one
    # request computing while the next one's upload arrives) without making requests fight
    # for the same core; measured on analyze (README, "Workers and the queue").
    worker_limit: int = 2
    queue_limit: int = 256  # requests waiting for a worker; beyond it: 503 overloaded at once
    queue_timeout: int = 30000  # longest wait for a worker, ms; then 503 overloaded
    # The event loop of ``run()``: asyncio's own, or uvloop (its loop machinery in C; README,
    # "Configuration", for what it measured). asyncio stays the default: under it the child's
    # exit is reported by Subprocess's SIGCHLD callback, with no thread per child.
    loop: str = "asyncio"
    # Who may use the API (auth.py): "auto" protects the API with a token when one is given
    # or when the gateway listens beyond loopback (one is generated); "token" always; "none"
    # never (authentication in front of the gateway).
    auth: str = "auto"
    token: Optional[str] = field(default=None, repr=False)  # never printed
    token_file: Optional[str] = None
    mode: str = DEVELOPMENT
    flask: FlaskConfig = field(default_factory=FlaskConfig)

    @property
    def is_development(self) -> bool:
        return self.mode != PRODUCTION


# --- value parsers: each returns the parsed value or raises ValueError with a reason ---------

def _port(raw: str) -> int:
    value = int(raw.strip(), 10)
    if not 1 <= value <= 65535:
        raise ValueError("a port must be between 1 and 65535")
    return value


def _gateway_port(raw: str) -> int:
    value = int(raw.strip(), 10)
    if not 0 <= value <= 65535:  # 0 = any free port, useful in tests
        raise ValueError("a port must be between 0 and 65535")
    return value


# ~31 years. Times become float seconds (timers, timeouts): a longer one is no longer a time,
# and past ~10**308 it raises OverflowError where it is used instead of here.
MAX_MS = 10 ** 12


def _positive_ms(raw: str) -> int:
    value = int(raw.strip(), 10)
    if value <= 0:
        raise ValueError("must be a positive number of milliseconds")
    if value > MAX_MS:
        raise ValueError("must be at most %d milliseconds" % MAX_MS)
    return value


def _non_negative_ms(raw: str) -> int:
    value = int(raw.strip(), 10)
    if not 0 <= value <= MAX_MS:
        raise ValueError("must be between 0 and %d milliseconds" % MAX_MS)
    return value


def _positive_int(raw: str) -> int:
    value = int(raw.strip(), 10)
    if value <= 0:
        raise ValueError("must be a positive whole number")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw.strip(), 10)
    if value < 0:
        raise ValueError("must be zero or a positive whole number")
    return value


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _host(raw: str) -> str:
    value = raw.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if _HOSTNAME.match(value):
        return value
    raise ValueError("not an IP address or host name")


def _size(raw: str) -> int:
    text = raw.strip().lower().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
             "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3,
             "t": 1024 ** 4, "tb": 1024 ** 4, "tib": 1024 ** 4}
    match = re.fullmatch(r"(\d+)([a-z]*)", text)
    if not match or match.group(2) not in units:
        raise ValueError("must be a byte count such as 1073741824, 512M or 4G")
    value = int(match.group(1)) * units[match.group(2)]
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _mode(raw: str) -> str:
    return PRODUCTION if raw.strip().lower() in ("production", "prod") else DEVELOPMENT


def _url(raw: str) -> str:
    value = raw.strip()
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http",) or not parts.hostname:
        raise ValueError("must be an http:// URL such as http://127.0.0.1:5001")
    try:
        parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be the server's root URL, without a path or query")
    return value.rstrip("/")


def _urls(raw: str) -> Tuple[str, ...]:
    urls = tuple(_url(part) for part in raw.split(",") if part.strip())
    if not urls:
        raise ValueError("must be an http:// URL such as http://127.0.0.1:5001")
    if len(set(urls)) != len(urls):
        raise ValueError("lists the same URL twice")
    return urls


MAX_WORKERS = 64


def _workers(raw: str) -> int:
    value = _positive_int(raw)
    if value > MAX_WORKERS:
        raise ValueError("must be at most %d" % MAX_WORKERS)
    return value


def _upstream(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("keepalive", "simple"):
        raise ValueError("must be 'keepalive' or 'simple'")
    return value


LOOPS = ("asyncio", "uvloop")
AUTH_MODES = ("auto", "token", "none")


def _auth(raw: str) -> str:
    value = raw.strip().lower()
    if value not in AUTH_MODES:
        raise ValueError("must be 'auto', 'token' or 'none'")
    return value


def uvloop_problem(platform: str = sys.platform,
                   import_module: Callable[[str], Any] = importlib.import_module
                   ) -> Optional[str]:
    """Why uvloop cannot be used here, or None when it can."""
    if platform.startswith("win"):
        return "uvloop does not run on Windows; use asyncio"
    try:
        import_module("uvloop")
    except ImportError as exc:
        return "uvloop is not installed (%s); pip install uvloop, or use asyncio" % exc
    return None


def _loop(raw: str) -> str:
    value = raw.strip().lower()
    if value not in LOOPS:
        raise ValueError("must be 'asyncio' or 'uvloop'")
    if value == "uvloop":
        problem = uvloop_problem()
        if problem:
            raise ValueError(problem)
    return value


def _text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


class Setting(NamedTuple):
    """One row of the settings table: the only place that names a setting's variable, flag,
    parser, meaning and unit (``--help`` and the README's table are read from it)."""

    env: str
    option: str
    parse: Callable[[str], Any]
    where: str  # "gateway" or "flask": which dataclass holds it
    meaning: str
    unit: str = ""  # "ms", "bytes"... shown after the default
    metavar: str = "VALUE"


SETTINGS: Dict[str, Setting] = {
    "host": Setting("GATEWAY_HOST", "--host", _host, "gateway",
                    "address the gateway listens on", metavar="ADDR"),
    "port": Setting("GATEWAY_PORT", "--port", _gateway_port, "gateway",
                    "port the gateway listens on (0: any free port)", metavar="PORT"),
    "max_body": Setting("GATEWAY_MAX_BODY", "--max-body", _size, "gateway",
                        "largest request body proxied (512M, 4G... accepted)", "bytes",
                        metavar="SIZE"),
    "proxy_timeout": Setting("GATEWAY_PROXY_TIMEOUT", "--proxy-timeout", _positive_ms,
                             "gateway", "longest whole proxied exchange", "ms", metavar="MS"),
    "connect_timeout": Setting("GATEWAY_CONNECT_TIMEOUT", "--connect-timeout", _positive_ms,
                               "gateway", "connect timeout to a worker", "ms", metavar="MS"),
    "ready_wait": Setting("GATEWAY_READY_WAIT", "--ready-wait", _non_negative_ms, "gateway",
                          "how long a request waits for a starting service", "ms",
                          metavar="MS"),
    "upstream": Setting("GATEWAY_UPSTREAM", "--upstream", _upstream, "gateway",
                        "HTTP client to the workers: keepalive (a connection pool) or simple "
                        "(a connection per request)", metavar="CLIENT"),
    "idle_timeout": Setting("GATEWAY_IDLE_TIMEOUT", "--idle-timeout", _positive_ms, "gateway",
                            "idle keep-alive connection, and a whole request head", "ms",
                            metavar="MS"),
    "body_timeout": Setting("GATEWAY_BODY_TIMEOUT", "--body-timeout", _positive_ms, "gateway",
                            "a request body that sends nothing this long is refused (408)",
                            "ms", metavar="MS"),
    "worker_limit": Setting("GATEWAY_WORKER_LIMIT", "--worker-limit", _positive_int,
                            "gateway", "work requests (all but GET, HEAD, OPTIONS) in flight "
                            "per worker; more wait in the queue",
                            metavar="N"),
    "queue_limit": Setting("GATEWAY_QUEUE_LIMIT", "--queue-limit", _non_negative_int,
                           "gateway", "requests waiting for a worker; beyond: 503 overloaded",
                           metavar="N"),
    "queue_timeout": Setting("GATEWAY_QUEUE_TIMEOUT", "--queue-timeout", _positive_ms,
                             "gateway", "longest wait for a worker; then 503 overloaded", "ms",
                             metavar="MS"),
    "loop": Setting("GATEWAY_LOOP", "--loop", _loop, "gateway",
                    "the gateway's event loop: asyncio, or uvloop (POSIX, CPython)",
                    metavar="LOOP"),
    "auth": Setting("GATEWAY_AUTH", "--auth", _auth, "gateway",
                    "API access: auto (a token when given, or generated when listening beyond "
                    "loopback), token (always), none (open: authenticate in front)",
                    metavar="MODE"),
    "token": Setting("GATEWAY_TOKEN", "--token", _text, "gateway",
                     "the API's bearer token (Authorization: Bearer ...)", metavar="TOKEN"),
    "token_file": Setting("GATEWAY_TOKEN_FILE", "--token-file", _text, "gateway",
                          "a file whose first line is the token", metavar="PATH"),
    "workers": Setting("FLASK_WORKERS", "--workers", _workers, "flask",
                       "worker processes, on ports FLASK_PORT, FLASK_PORT+1...", metavar="N"),
    "script": Setting("FLASK_SCRIPT", "--flask-script", _text, "flask",
                      "the service's entry script", metavar="PATH"),
    "flask_host": Setting("FLASK_HOST", "--flask-host", _host, "flask",
                          "address the workers listen on", metavar="ADDR"),
    "flask_port": Setting("FLASK_PORT", "--flask-port", _port, "flask",
                          "port of the first worker", metavar="PORT"),
    "health_timeout": Setting("FLASK_HEALTH_TIMEOUT", "--health-timeout", _positive_ms,
                              "flask", "how long a starting worker may take to be healthy",
                              "ms", metavar="MS"),
    "health_interval": Setting("FLASK_HEALTH_INTERVAL", "--health-interval", _positive_ms,
                               "flask", "time between health checks", "ms", metavar="MS"),
    "health_retries": Setting("FLASK_HEALTH_RETRIES", "--health-retries", _positive_int,
                              "flask", "health checks while starting", metavar="N"),
    "unhealthy_after": Setting("FLASK_UNHEALTHY_AFTER", "--unhealthy-after", _positive_int,
                               "flask", "failed checks in a row before a worker is unhealthy",
                               metavar="N"),
    "shutdown_timeout": Setting("FLASK_SHUTDOWN_TIMEOUT", "--shutdown-timeout", _positive_ms,
                                "flask", "wait after SIGTERM before killing a worker's tree",
                                "ms", metavar="MS"),
    "python": Setting("FLASK_PYTHON", "--python", _text, "flask",
                      "interpreter of the workers", metavar="PATH"),
    "url": Setting("FLASK_URL", "--flask-url", _urls, "flask",
                   "external service URL(s), comma-separated: spawn nothing, proxy there",
                   metavar="URL"),
    "auto_restart": Setting("FLASK_AUTO_RESTART", "--auto-restart", _non_negative_int,
                            "flask", "times an exited worker is restarted (0: never)",
                            metavar="N"),
}

#: Defaults that are not one value, in words (``--help``, warnings).
DESCRIBED_DEFAULTS = {
    "workers": "1 in development, one per CPU in production",
    "python": "the gateway's own interpreter, then python3 / python on PATH",
    "url": "none: spawn the workers",
    "token": "none",
    "token_file": "none",
}


_FLASK_FIELD = {"flask_host": "host", "flask_port": "port"}


class _Described(str):
    """A default that depends on other settings, shown as words in a warning."""

    def __repr__(self) -> str:
        return str(self)


def _default(name: str) -> Any:
    if name in DESCRIBED_DEFAULTS:
        return _Described("(%s)" % DESCRIBED_DEFAULTS[name])
    where = SETTINGS[name].where
    if where == "gateway":
        return getattr(GatewayConfig(), name)
    return getattr(FlaskConfig(), _FLASK_FIELD.get(name, name))


def load_config(
    environ: Optional[Mapping[str, str]] = None,
    overrides: Optional[Mapping[str, Optional[str]]] = None,
    warn: Optional[Callable[[str], None]] = None,
) -> GatewayConfig:
    """Build the configuration from ``environ`` (default ``os.environ``) and CLI ``overrides``.

    ``overrides`` maps setting names (keys of :data:`SETTINGS`, plus ``"mode"``) to raw strings;
    a value of ``None`` means "not given". An override wins over the environment. Missing values
    take the default; an invalid one produces one warning through ``warn`` (default: this
    module's logger) and takes the default. Never raises for a bad value.
    """
    env = os.environ if environ is None else environ
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    warn = warn or log.warning
    values: dict[str, Any] = {}

    for name, (var, option, parse, *_rest) in SETTINGS.items():
        if name in given:
            raw, source = str(given[name]), option
        elif env.get(var) not in (None, ""):
            raw, source = env[var], var
        else:
            continue
        try:
            values[name] = parse(raw)
        except (ValueError, TypeError) as exc:
            reason = _reason(exc)
            warn("Invalid %s=%r (%s); using the default %r." % (source, raw, reason, _default(name)))

    if "mode" in given:
        mode = _mode(str(given["mode"]))
    else:
        mode = _mode(env.get("GATEWAY_ENV") or env.get("NODE_ENV") or DEVELOPMENT)

    flask_kwargs = {_FLASK_FIELD.get(k, k): v for k, v in values.items() if SETTINGS[k].where == "flask"}
    gateway_kwargs = {k: v for k, v in values.items() if SETTINGS[k].where == "gateway"}
    urls = flask_kwargs.pop("url", ())
    if urls:
        flask_kwargs.update(url=urls[0], urls=urls)
    flask = FlaskConfig(mode=mode, **flask_kwargs)
    if flask.url:
        parts = urllib.parse.urlsplit(flask.url)
        flask = FlaskConfig(**{**_fields(flask), "host": parts.hostname or flask.host,
                               "port": parts.port or 80})
    elif flask.port + flask.worker_count - 1 > 65535:
        warn("FLASK_PORT=%d leaves no room for %d workers (ports %d and up); using %d worker%s."
             % (flask.port, flask.worker_count, flask.port, 65536 - flask.port,
                "" if flask.port == 65535 else "s"))
        flask = FlaskConfig(**{**_fields(flask), "workers": 65536 - flask.port})
    return GatewayConfig(mode=mode, flask=flask, **gateway_kwargs)


def _fields(config: Any) -> dict:
    # a frozen dataclass's fields, without what cached_property stored beside them
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def worker_config(config: FlaskConfig, index: int) -> FlaskConfig:
    """The settings of worker ``index`` (0-based) of the group: its own port (``port +
    index``), or its own URL of ``urls`` for external servers."""
    if config.url:
        url = config.urls[index] if config.urls else config.url
        parts = urllib.parse.urlsplit(url)
        return dataclasses.replace(config, url=url, urls=(url,),
                                   host=parts.hostname or config.host, port=parts.port or 80)
    return dataclasses.replace(config, port=config.port + index, workers=1)


def describe_default(name: str) -> str:
    """A setting's default as a person reads it: ``300000 ms``, ``127.0.0.1``, or words."""
    if name in DESCRIBED_DEFAULTS:
        return DESCRIBED_DEFAULTS[name]
    value = _default(name)
    unit = SETTINGS[name].unit
    if unit == "bytes":
        return _human_size(value)
    return ("%s %s" % (value, unit)).strip()


def _human_size(value: int) -> str:
    for unit, size in (("G", 1024 ** 3), ("M", 1024 ** 2)):
        if value % size == 0:
            return "%d%s" % (value // size, unit)
    return str(value)


def settings_table() -> str:
    """The settings as a Markdown table (the README's, which a test keeps equal to this)."""
    rows = ["| setting | env | flag | default |", "|---|---|---|---|"]
    for name, setting in SETTINGS.items():
        rows.append("| %s | `%s` | `%s` | %s |" % (setting.meaning.replace("|", "/"),
                                                   setting.env, setting.option,
                                                   describe_default(name)))
    rows.append("| development or production | `GATEWAY_ENV`, then `NODE_ENV` | `--mode` / "
                "`--production` | development |")
    return "\n".join(rows) + "\n"


def check_value(name: str, raw: str) -> str:
    """Parse ``raw`` as setting ``name``; raise ValueError with a person's reason if invalid.
    For command-line flags, which are refused (a typo on the command line is the user's to
    fix now), unlike environment variables (warned about, default used)."""
    try:
        SETTINGS[name].parse(raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(_reason(exc)) from None
    return raw


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return "not a number" if text.startswith("invalid literal") else text


def default_python() -> str:
    """The interpreter the child runs under when FLASK_PYTHON is unset: the gateway's own."""
    return sys.executable
