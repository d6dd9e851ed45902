"""A child that dies while importing its dependencies (exit code 1, traceback on stderr)."""
import sys

print("starting the crashing child", flush=True)
import deepfake_dependency_that_is_not_installed  # noqa: E402,F401

sys.exit(0)
