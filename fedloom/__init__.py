"""fedloom: the client SDK of the fedloom federated-learning server.

``FLClient`` drives the server's REST API and needs only httpx and pydantic. ``run_client`` and
``ClientApp`` federate your own PyTorch model; they, and the built-in client (:mod:`fedloom.runtime`,
the ``fedloom client`` command), need ``pip install 'fedloom[torch]'``; the
server itself and its process tooling (:mod:`fedloom_tools`) need ``pip install 'fedloom[server]'``.
"""

from fedloom._client import FLAPIError, FLClient
from fedloom._retry import Backoff
from fedloom.app import ClientApp, ModelMismatchError, RegistrationError, run_client

__all__ = ["Backoff", "ClientApp", "FLAPIError", "FLClient", "ModelMismatchError", "RegistrationError", "run_client"]
__version__ = "0.1.0"
