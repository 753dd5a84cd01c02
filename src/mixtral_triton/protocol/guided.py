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

from dataclasses import dataclass

from mixtral_triton.protocol.predict import RequestError

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


def read_guide(guide_type: str | None, guide: str | None) -> Guide | None:
    """The request's guide, or None when it asks for no guided decoding; RequestError naming
    the field for a type outside GUIDE_TYPES, a missing guide, or one over MAX_GUIDE_CHARS."""
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
        raise RequestError(GUIDE_FIELD, f"{GUIDE_FIELD} is required for {TYPE_FIELD} {guide_type!r} "
                           "(the schema, regex or grammar to follow)")
    if len(guide) > MAX_GUIDE_CHARS:
        raise RequestError(GUIDE_FIELD, f"{GUIDE_FIELD} must be at most {MAX_GUIDE_CHARS} characters, "
                           f"got {len(guide)}")
    return Guide(guide_type, guide)
