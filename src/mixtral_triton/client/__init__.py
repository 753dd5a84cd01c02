"""Python client of the predict API over Triton's gRPC streaming (the ensemble model)."""

from mixtral_triton.client.ensemble import Chunk, Completion, ServerError
from mixtral_triton.client.sync import PredictClient

__all__ = ["Chunk", "Completion", "PredictClient", "ServerError"]
