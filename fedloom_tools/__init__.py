"""Process tooling around the server: the ``fedloom serve`` supervisor, launch helpers, the demo and the load test.

Not part of the client SDK (``fedloom``): these start and watch server processes, and the supervisor
and demo need the ``server`` extra (``pip install 'fedloom[server]'``).
"""
