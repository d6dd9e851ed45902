"""Fails at import, like a service whose dependencies are not installed: exit code 1 with a
ModuleNotFoundError traceback on stderr."""
import sys

print("import_error: starting", flush=True)
import deepfake_dependency_that_is_not_installed  # noqa: E402,F401

sys.exit(0)  # never reached
