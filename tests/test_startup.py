"""Start-up: the package imports lazily, and a Ctrl+C while the gateway is still importing
Tornado is a quiet exit 0."""
from __future__ import annotations

import importlib.abc
import subprocess
import sys

import pytest

import tornado_gateway
from tornado_gateway import __main__ as cli


def test_importing_the_package_loads_no_tornado_until_a_name_is_used():
    code = ("import sys, tornado_gateway\n"
            "assert 'tornado.web' not in sys.modules, 'eager'\n"
            "for name in tornado_gateway.__all__:\n"
            "    getattr(tornado_gateway, name)\n"
            "assert 'tornado.web' in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_every_exported_name_is_the_one_in_its_module():
    from tornado_gateway import server
    from tornado_gateway.supervisor import bridge
    from tornado_gateway.http import server as http_server
    assert tornado_gateway.PythonBridge is bridge.PythonBridge
    assert tornado_gateway.GatewayHTTPServer is http_server.GatewayHTTPServer
    assert tornado_gateway.run is server.run
    with pytest.raises(AttributeError):
        tornado_gateway.NoSuchThing  # noqa: B018


class _InterruptImport(importlib.abc.MetaPathFinder):
    """Raises KeyboardInterrupt where Ctrl+C lands most often: importing the server."""

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name == "tornado_gateway.server":
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_importing_is_exit_0_without_a_traceback(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "tornado_gateway.server")
    monkeypatch.delattr(tornado_gateway, "server", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptImport()] + sys.meta_path)
    assert cli.main(["--port", "0"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
