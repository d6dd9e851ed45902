"""tornado_gateway: a Tornado front door that runs, watches and proxies a Flask child.

The pieces an embedding application needs::

    from tornado_gateway import PythonBridge, gateway_routes, load_config

Names are imported on first use, so ``python -m tornado_gateway`` parses its command line
(and answers ``--help``) before Tornado is loaded, and a Ctrl+C during that import is an
ordinary, quiet exit.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List

__version__ = "0.1.0"

_WHERE: Dict[str, str] = {
    "BridgeState": ".supervisor.state",
    "DeepfakeProxyHandler": ".proxy",
    "FlaskConfig": ".config",
    "GatewayConfig": ".config",
    "GatewayHTTPServer": ".http.server",
    "PythonBridge": ".supervisor.bridge",
    "configure_http_client": ".proxy",
    "configure_upstream_client": ".server",
    "gateway_routes": ".app",
    "UpstreamClient": ".proxy",
    "WorkerGroup": ".supervisor.group",
    "load_config": ".config",
    "make_app": ".app",
    "proxy_routes": ".proxy",
    "run": ".server",
    "serve": ".server",
}

__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # once
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_WHERE))
