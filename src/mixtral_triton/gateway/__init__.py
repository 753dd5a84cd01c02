"""The HTTP gateway: the Truss `predict` contract and OpenAI-compatible routes in front of
Triton's gRPC streaming, as an ASGI app (FastAPI on uvicorn).

openai_requests.py: OpenAI's requests mapped onto the predict fields (its field table);
wire_formats.py: how answers are written (predict text or JSON, OpenAI objects and events);
schemas.py: the OpenAPI request schemas (generated from the field tables) and response
models; http_errors.py: errors as HTTP answers; generation.py: how a generation runs (the
concurrency bound, cancellation on disconnect); chat.py: the chat template; metrics.py:
Prometheus; app.py: the routes; cli.py: the command.
"""

from mixtral_triton.gateway.app import create_app
from mixtral_triton.gateway.generation import GatewaySettings, Serving

__all__ = ["GatewaySettings", "Serving", "create_app"]
