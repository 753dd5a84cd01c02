"""Read a Triton config.pbtxt into Triton's own ModelConfig protobuf, with errors that
point at the file and line, before Triton gets to see it."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import ModelConfig

from mixtral_triton.errors import UserError


def parse_config(text: str, source: str | Path) -> ModelConfig:
    """Parse config.pbtxt text (`source` names it in errors) and check what protobuf cannot."""
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        # str(exc) starts with "line:column : "; say it our way, with the file.
        message = str(exc).split(" : ", 1)[-1]
        raise UserError(f"{source}:{exc.GetLine()}:{exc.GetColumn()}: {message}") from None
    validate_config(config, source)
    return config


def load_config(path: Path) -> ModelConfig:
    return parse_config(path.read_text(), path)


def validate_config(config: ModelConfig, source: str | Path) -> None:
    """The mistakes Triton would only report at load time, in a server log."""
    if not config.name:
        raise UserError(f"{source}: no model name")
    if not (config.backend or config.platform):
        raise UserError(f"{source}: model {config.name!r} names neither a backend nor a platform")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        seen: set[str] = set()
        for tensor in tensors:
            if tensor.name in seen:
                raise UserError(f"{source}: {kind} {tensor.name!r} is declared twice")
            seen.add(tensor.name)
            if not tensor.data_type:
                raise UserError(f"{source}: {kind} {tensor.name!r} has no data_type")
            if not tensor.dims:
                raise UserError(f"{source}: {kind} {tensor.name!r} has no dims")
