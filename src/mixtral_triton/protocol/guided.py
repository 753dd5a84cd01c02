"""Guided decoding (structured output) requests as TensorRT-LLM 1.2.1's ensemble takes them:
`guided_decoding_guide_type` and `guided_decoding_guide`.

The types are those the tensorrtllm backend maps to the executor's GuidedDecodingParams
(triton_backend/inflight_batcher_llm/src/utils.cc, getGuidedDecodingParamsFromTensors):
json, json_schema, regex, ebnf_grammar. The executor also knows a structural tag, which
the backend does not map (a request naming it would silently run unguided there), so it is
refused here. Every type but `json` needs a guide; `json` ignores one, as the executor does.
An empty type means no guided decoding (the backend ignores a type it does not map).

Whether a guide compiles is checked with xgrammar (mixtral_triton.guided), not here: this
module only reads the request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from mixtral_triton.protocol.errors import RequestError

TYPE_FIELD = "guided_decoding_guide_type"
GUIDE_FIELD = "guided_decoding_guide"
GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")
# A bound on the guide's size, so that a huge schema cannot occupy the compiler: 64 Ki
# characters hold any schema a tool call or an extraction needs.
MAX_GUIDE_CHARS = 65536


@dataclass(frozen=True)
class Guide:
    type: str  # one of GUIDE_TYPES
    text: str  # the schema, regex or grammar ("" for json)


def read_guide(guide_type: str | None, guide: str | None, guide_field: str = GUIDE_FIELD) -> Guide | None:
    """The request's guide, or None when it asks for no guided decoding; RequestError naming
    the field for a type outside GUIDE_TYPES, a missing guide, or one over MAX_GUIDE_CHARS
    (`guide_field`: the request field the guide came in)."""
    guide_type, guide = guide_type or "", guide or ""
    if not guide_type:
        if guide:
            raise RequestError(TYPE_FIELD, f"{GUIDE_FIELD} needs {TYPE_FIELD} (one of "
                               f"{', '.join(GUIDE_TYPES)}), got none")
        return None
    if guide_type not in GUIDE_TYPES:
        raise RequestError(TYPE_FIELD, f"{TYPE_FIELD} must be one of {', '.join(GUIDE_TYPES)} "
                           f"(TensorRT-LLM 1.2.1's), got {guide_type[:60]!r}")
    if guide_type == "json":
        return Guide("json", "")
    if not guide.strip():
        raise RequestError(guide_field, f"{guide_field} is required for {TYPE_FIELD} {guide_type!r} "
                           "(the schema, regex or grammar to follow)")
    if len(guide) > MAX_GUIDE_CHARS:
        raise RequestError(guide_field, f"{guide_field} must be at most {MAX_GUIDE_CHARS} characters, "
                           f"got {len(guide)}")
    return Guide(guide_type, guide)


def guide_inputs(guide: Guide | None) -> dict[str, np.ndarray]:
    """The ensemble inputs that carry `guide` (none for no guide)."""
    if guide is None:
        return {}
    return {TYPE_FIELD: np.array([[guide.type.encode()]], dtype=object),
            GUIDE_FIELD: np.array([[guide.text.encode("utf-8")]], dtype=object)}


# OpenAI's response_format types and the guide type each asks for ("text": none).
RESPONSE_FORMAT_TYPES = {"text": None, "json_object": "json", "json_schema": "json_schema"}
RESPONSE_FORMAT_FIELD = "response_format"


def guide_of_response_format(value: object) -> Guide | None:
    """OpenAI's `response_format` ({"type": "text"}, {"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}) as
    a guide; RequestError naming response_format for any other shape. The schema is followed
    strictly whatever `strict` says (a guided decoder cannot follow it loosely)."""
    field = RESPONSE_FORMAT_FIELD
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in RESPONSE_FORMAT_TYPES:
        raise RequestError(field, f"{field} must be an object whose type is one of "
                           f"{', '.join(RESPONSE_FORMAT_TYPES)}, got {json.dumps(value)[:60]}")
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    if set(value) - allowed:
        raise RequestError(field, f"{field} of type {kind!r} takes only {', '.join(sorted(allowed))}, "
                           f"got {', '.join(sorted(map(str, value)))}")
    if kind != "json_schema":
        return None if RESPONSE_FORMAT_TYPES[kind] is None else Guide("json", "")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict) \
            or set(spec) - {"name", "schema", "strict", "description"}:
        raise RequestError(field, f"{field}.json_schema must be an object with a schema object "
                           "(and optionally name, strict, description)")
    return read_guide("json_schema", json.dumps(spec["schema"]), field)


# The JSON Schema of what guide_of_response_format accepts (null: no guide).
RESPONSE_FORMAT_SCHEMA = {"anyOf": [
    {"type": "object", "required": ["type"], "additionalProperties": False,
     "properties": {"type": {"enum": ["text", "json_object"]}}},
    {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False,
     "properties": {"type": {"enum": ["json_schema"]}, "json_schema": {
         "type": "object", "required": ["schema"], "additionalProperties": False,
         "properties": {"name": {"type": "string"}, "schema": {"type": "object"},
                        "strict": {"type": ["boolean", "null"]}, "description": {"type": "string"}}}}},
    {"type": "null"}]}
