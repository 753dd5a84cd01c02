"""The wire protocol of the `predict` API, shared by the client, the gateway and the Triton models."""

from mixtral_triton.protocol.ensemble import (
    ENSEMBLE_ONLY_BY_NAME,
    ENSEMBLE_ONLY_INPUTS,
    EnsembleInput,
    ensemble_input_specs,
)
from mixtral_triton.protocol.predict import (
    FIELDS,
    FIELDS_BY_NAME,
    MAX_STOP_CHARS,
    MAX_STOPS,
    FieldSpec,
    PredictRequest,
    RequestError,
    check_lengths,
    ensemble_inputs,
    fields_markdown,
    json_schema,
    parse_request,
)

__all__ = [
    "ENSEMBLE_ONLY_BY_NAME",
    "ENSEMBLE_ONLY_INPUTS",
    "EnsembleInput",
    "ensemble_input_specs",
    "FIELDS",
    "FIELDS_BY_NAME",
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "FieldSpec",
    "PredictRequest",
    "RequestError",
    "check_lengths",
    "ensemble_inputs",
    "fields_markdown",
    "json_schema",
    "parse_request",
]
