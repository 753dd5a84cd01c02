"""The gateway's routes (FastAPI). What they accept: openai_requests.py (OpenAI's requests
mapped onto mixtral_triton.protocol's predict fields); how they answer: wire_formats.py,
documented by schemas.py; how a generation runs: generation.py.

    POST /predict               the Truss contract: text/plain stream, or JSON with stream false
    POST /v1/completions        OpenAI completions (SSE with `stream`)
    POST /v1/chat/completions   OpenAI chat, with the checkpoint's chat template
    GET  /v1/models             the served model
    GET  /health                live
    GET  /ready                 Triton and the ensemble model ready (503 otherwise)
    GET  /metrics               Prometheus

With an API key configured, every route but /health, /ready, /metrics and the OpenAPI
document needs `Authorization: Api-Key <key>` (as Truss) or `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader

from mixtral_triton.gateway.generation import GatewaySettings, Serving, log
from mixtral_triton.gateway.http_errors import GatewayError
from mixtral_triton.gateway.metrics import Metrics, MetricsMiddleware
from mixtral_triton.gateway.openai_requests import parse_chat_request, parse_completion_request
from mixtral_triton.gateway.schemas import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    PredictResponse,
    chat_request_schema,
    completion_request_schema,
    predict_request_schema,
)
from mixtral_triton.gateway.wire_formats import ChatFormat, CompletionFormat, PredictStream, PredictWhole
from mixtral_triton.protocol import RequestError, parse_request

_AUTH_SCHEMES = ("api-key", "bearer")


def _error_response(error: GatewayError, openai: bool) -> JSONResponse:
    return JSONResponse(error.body(openai), status_code=error.status, headers=error.headers)


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _errors(*statuses: int) -> dict:
    words = {400: "Invalid request (the field is named)", 401: "Missing or wrong API key",
             404: "No such model", 413: "The request body is over --max-body-size",
             429: "Too many generations in flight (see Retry-After)",
             500: "Generation failed", 503: "The model server is unavailable",
             504: "The model server did not answer in time"}
    return {status: {"model": ErrorResponse, "description": words[status]} for status in statuses}


def _sse(chunk: str) -> dict:
    """An event stream's media type entry. In OpenAPI 3.1 its schema describes each event
    (as 3.2's itemSchema does): `data` holds one JSON chunk (or an error object, should the
    server fail mid-stream), and the last event's is `[DONE]`."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    data = {"type": "string", "if": {"const": "[DONE]"}, "then": True,
            "else": {"contentMediaType": "application/json", "contentSchema": payload}}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data},
                       "description": "one server-sent event"}}


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, "invalid_request_error", f"the request body is larger than this "
                        f"gateway's limit of {limit} bytes (--max-body-size)")


async def _json_body(request: Request, limit: int):
    """The decoded JSON body, read up to `limit` bytes (413 beyond: a body announced as
    larger is refused before it is read). Invalid UTF-8 inside a string is kept as lone
    surrogates (surrogateescape), so that parse_request refuses it naming its field."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    too_deep = GatewayError(400, "invalid_request_error", f"the request body is JSON nested "
                            f"deeper than {MAX_JSON_DEPTH} levels")
    try:
        try:
            body = json.loads(raw)
        except UnicodeDecodeError:
            body = json.loads(raw.decode("utf-8", "surrogateescape"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GatewayError(400, "invalid_request_error", f"the request body is not valid JSON: {exc}")
    except RecursionError:  # [[[[...]]]]: json gives up at the interpreter's depth
        raise too_deep from None
    if _depth(body) > MAX_JSON_DEPTH:  # so that no check or message after this recurses deep
        raise too_deep
    return body


# The deepest request is a chat message's content parts: body, messages, message, content,
# part. Far deeper JSON is refused before anything walks it.
MAX_JSON_DEPTH = 32


def _depth(value) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            deepest = max(deepest, depth + 1)
            stack.extend((item, depth + 1) for item in value)
    return deepest


def _api_key_check(api_key: str):
    """The dependency that every protected route carries when a key is configured."""
    header = APIKeyHeader(name="Authorization", auto_error=False, scheme_name="ApiKey",
                          description="`Api-Key <key>` (as Truss) or `Bearer <key>`")
    # Compared as digests, in constant time: neither the key nor its length leaks.
    expected = hashlib.sha256(api_key.encode("utf-8")).digest()

    async def check(authorization: str | None = Depends(header)) -> None:
        scheme, _, given = (authorization or "").strip().partition(" ")
        given_digest = hashlib.sha256(given.strip().encode("utf-8")).digest()
        if scheme.lower() not in _AUTH_SCHEMES or not given.strip() \
                or not hmac.compare_digest(given_digest, expected):
            raise GatewayError(401, "authentication_error",
                               "a valid API key is required: send the header "
                               "'Authorization: Api-Key <key>' or 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": 'Bearer realm="mixtral-triton"'})

    return check


def create_app(settings: GatewaySettings, serving: Serving | None = None) -> FastAPI:
    metrics = serving.metrics if serving else Metrics()
    serving = serving or Serving(settings, metrics)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await serving.connect()
        yield
        await serving.close()

    app = FastAPI(title="mixtral-triton gateway", version="0.1.0", lifespan=lifespan,
                  description="Mixtral on Triton Inference Server: the Truss `predict` contract "
                  "and OpenAI-compatible completions and chat.")
    app.state.serving = serving
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    protected = [Depends(_api_key_check(settings.api_key))] if settings.api_key else []

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError):
        return _error_response(exc, _is_openai(request))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return _error_response(GatewayError.of_request_error(exc), _is_openai(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return _error_response(GatewayError(400, "invalid_request_error",
                                            first.get("msg", "invalid request"), field),
                               _is_openai(request))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return _error_response(GatewayError(500, "server_error", "internal error"),
                               _is_openai(request))

    @app.post("/predict", dependencies=protected, response_model=None,
              summary="Complete a prompt (the Truss predict contract)",
              responses={200: {"model": PredictResponse, "description":
                               "stream true: the completion's text as it is generated "
                               "(text/plain); stream false: JSON",
                               "content": {"text/plain": {"schema": {"type": "string"}}}},
                         **_errors(400, 401, 413, 429, 500, 503, 504)})
    async def predict(request: Request):
        body = await _json_body(request, settings.max_body_bytes)
        predict_request = parse_request(body)  # the predict API's validation, verbatim
        fmt = PredictStream() if predict_request.stream else PredictWhole()
        return serving.generation(predict_request, fmt, "/predict")

    @app.post("/v1/completions", dependencies=protected, response_model=None,
              summary="OpenAI completions",
              responses={200: {"model": CompletionResponse, "description":
                               "JSON, or with stream true server-sent events of the same "
                               "object, text in pieces, ending with `data: [DONE]`",
                               "content": {"text/event-stream": _sse("CompletionResponse")}},
                         **_errors(400, 401, 404, 413, 429, 500, 503, 504)})
    async def completions(request: Request):
        body = await _json_body(request, settings.max_body_bytes)
        openai_request = parse_completion_request(body, settings.model_name)  # ModelNotFound: 404
        fmt = CompletionFormat(openai_request, settings.model_name)
        return serving.generation(openai_request.predict, fmt, "/v1/completions")

    @app.post("/v1/chat/completions", dependencies=protected, response_model=None,
              summary="OpenAI chat completions (the model's chat template)",
              responses={200: {"model": ChatCompletionResponse, "description":
                               "JSON, or with stream true server-sent events of "
                               "chat.completion.chunk objects ending with `data: [DONE]`",
                               "content": {"text/event-stream": _sse("ChatCompletionChunk")}},
                         **_errors(400, 401, 404, 413, 429, 500, 503, 504)})
    async def chat_completions(request: Request):
        body = await _json_body(request, settings.max_body_bytes)
        openai_request = parse_chat_request(body, settings.model_name, serving.chat.render)  # ModelNotFound: 404
        fmt = ChatFormat(openai_request, settings.model_name)
        return serving.generation(openai_request.predict, fmt, "/v1/chat/completions")

    @app.get("/v1/models", dependencies=protected, response_model=ModelList,
             summary="The served model", responses=_errors(401))
    async def models():
        return ModelList(data=[ModelCard(id=settings.model_name, created=started)])

    @app.get("/health", summary="Live: the gateway answers")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="Ready: Triton and the ensemble model are ready",
             responses={503: {"description": "Triton or the ensemble model is not ready"}})
    async def ready():
        is_ready = await serving.ready()
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    # The request bodies are documented as schemas.py generates them from the field tables:
    # set after FastAPI has built the document, whose own models would turn 2**64 - 1 into a
    # float and drop the null defaults.
    bodies = {"/predict": predict_request_schema(),
              "/v1/completions": completion_request_schema(),
              "/v1/chat/completions": chat_request_schema()}

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version,
                                   description=app.description, routes=app.routes)
            for path, schema in bodies.items():
                document["paths"][path]["post"]["requestBody"] = {
                    "required": True, "content": {"application/json": {"schema": schema}}}
            # the chat chunk is referenced only by the event stream's schema
            chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(chunk.pop("$defs", {}))
            schemas["ChatCompletionChunk"] = chunk
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
    return app
