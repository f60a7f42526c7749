"""fedloom: the client SDK of the fedloom federated-learning server.

``FLClient`` drives the server's REST API and needs only httpx and pydantic. The training runtime
(:mod:`fedloom.runtime`, the ``fedloom client`` command) needs ``pip install 'fedloom[torch]'``; the
server itself and its process tooling (:mod:`fedloom_tools`) need ``pip install 'fedloom[server]'``.
"""

from fedloom._client import FLAPIError, FLClient

__all__ = ["FLAPIError", "FLClient"]
__version__ = "0.1.0"
