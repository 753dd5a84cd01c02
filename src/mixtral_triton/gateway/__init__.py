"""The HTTP gateway: the Truss `predict` contract and OpenAI-compatible routes in front of
Triton's gRPC streaming, as an ASGI app (FastAPI on uvicorn).

protocol.py: what the routes accept and answer; serving.py: how a generation runs (the
concurrency bound, cancellation on disconnect); app.py: the routes; cli.py: the command.
"""

from mixtral_triton.gateway.app import create_app
from mixtral_triton.gateway.serving import GatewaySettings, Serving

__all__ = ["GatewaySettings", "Serving", "create_app"]
