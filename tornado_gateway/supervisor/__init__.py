"""Supervision of the service's worker processes: starting, watching, restarting, stopping.

* :mod:`.state`: the states of a child and their transitions, readiness;
* :mod:`.child`: spawning and stopping a process tree (POSIX and Windows behind one
  interface);
* :mod:`.logpump`: a thread per pipe, the child's lines prefixed ``[Python] ``;
* :mod:`.health`: the periodic health check;
* :mod:`.bridge`: ``PythonBridge``, one child's whole lifecycle;
* :mod:`.group`: ``WorkerGroup``, N bridges, with :mod:`.dispatch` (which worker serves a
  request, the queue).

Nothing here knows about HTTP serving or the proxy's routes: the proxy reads a bridge's state
and asks the group for a worker; this layer never calls up.
"""
