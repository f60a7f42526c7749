"""fedloom: the client SDK of the fedloom federated-learning server."""

from fedloom._client import FLAPIError, FLClient

__all__ = ["FLAPIError", "FLClient"]
__version__ = "0.1.0"
