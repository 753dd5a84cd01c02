"""CPU reference of what the TensorRT-LLM engine computes: a Mixtral forward from the TP
rank shards of a converted checkpoint, and an in-flight-batching engine with TensorRT-LLM's
executor semantics on top of it."""

from mixtral_triton.reference.engine import Engine, Event, Request, RequestHandle
from mixtral_triton.reference.forward import ModelConfig, ReferenceModel, SequenceCache
from mixtral_triton.reference.sampling import SamplingParams, TokenSampler

__all__ = ["Engine", "Event", "ModelConfig", "ReferenceModel", "Request", "RequestHandle", "SamplingParams",
           "SequenceCache", "TokenSampler"]
