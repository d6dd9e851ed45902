"""tornado_gateway: a Tornado front door that runs, watches and proxies a Flask child.

The pieces an embedding application needs::

    from tornado_gateway import (PythonBridge, configure_upstream_client, gateway_routes,
                                 load_config)
"""
__version__ = "0.1.0"

from .app import gateway_routes, make_app  # noqa: E402
from .bridge import PythonBridge  # noqa: E402
from .config import FlaskConfig, GatewayConfig, load_config  # noqa: E402
from .proxy import DeepfakeProxyHandler, configure_http_client, proxy_routes  # noqa: E402
from .server import configure_upstream_client, run, serve  # noqa: E402
from .state import BridgeState  # noqa: E402

__all__ = [
    "BridgeState", "DeepfakeProxyHandler", "FlaskConfig", "GatewayConfig", "PythonBridge",
    "configure_http_client", "configure_upstream_client", "gateway_routes", "load_config",
    "make_app", "proxy_routes", "run", "serve", "__version__",
]
