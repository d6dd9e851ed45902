"""The real service under Werkzeug's reloader: the child is the reloader, the server its child
(the gateway's grandchild)."""
import os
import runpy
import sys

SERVICE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "python",
                       "api_server.py")
sys.argv = [SERVICE] + sys.argv[1:] + ["--reload"]
runpy.run_path(os.path.normpath(SERVICE), run_name="__main__")
