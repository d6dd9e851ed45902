"""tornado_gateway: a Tornado front door that runs, watches and proxies a Flask child."""
__version__ = "0.1.0"
