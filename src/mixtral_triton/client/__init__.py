"""Python clients of the predict API over Triton's gRPC streaming (the ensemble model):
PredictClient (blocking) and AsyncPredictClient (asyncio), one wire format."""

from mixtral_triton.client.aio import AsyncPredictClient
from mixtral_triton.client.ensemble import Chunk, Completion, ServerError
from mixtral_triton.client.sync import PredictClient

__all__ = ["AsyncPredictClient", "Chunk", "Completion", "PredictClient", "ServerError"]
