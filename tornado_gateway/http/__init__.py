"""The gateway's HTTP transport: what reads and writes HTTP/1.1 on sockets.

* :mod:`.server`: ``GatewayHTTPServer``, serving a Tornado ``Application`` on asyncio
  protocols, requests parsed by llhttp (httptools);
* :mod:`.client`: the proxy's upstream ``AsyncHTTPClient``, a keep-alive pool whose responses
  are parsed by llhttp;
* :mod:`.framing`: the framing decisions the gateway makes itself (what the proxy refuses,
  how a response body is delimited, when a connection closes), written once;
* :mod:`.headers`: ``HTTPHeaders`` built and read through Tornado's public API.

Nothing here knows about children, workers or the proxy's routes: the layer above (the proxy
and its app) depends on this one, never the other way.
"""
