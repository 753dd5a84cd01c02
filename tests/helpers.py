"""Helpers shared by several test modules: the paced server's settings (generations that
outlast a test by construction), the field-rule table, the engine's request gauge, an
in-process gateway, raw gRPC streams on any model, a stream reader thread, and one-line CLI
errors."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import uvicorn
from tritonclient.utils import np_to_triton_dtype

from mixtral_triton.client import Completion, PredictClient
from mixtral_triton.gateway import GatewaySettings, Serving, create_app
from mixtral_triton.protocol import FIELDS, MAX_STOP_CHARS, MAX_STOPS
from mixtral_triton.protocol.predict import FLOAT32_MAX
from mixtral_triton.repository.fill import MARKER, Settings
from mixtral_triton.roofline import decode_step_seconds

PROMPT = "What is mistral wind?"


# ---------------------------------------------------------------------------------------
# Generations that outlast the test, by construction
#
# A test that needs a generation still running at a later event (its cancel, a disconnect,
# a full queue, a server stop or restart) must not count on the machine being slow: on the
# CPU reference engine 1800 tokens took 15 s on one machine and 6 s on another, and would
# take 0.6 s on one ten times faster. Such tests run on the *paced server*: the same
# serving path (tokenizer, C++ detokenizer, Triton, gateway) in front of the stand-in
# engine of mixtral_triton.standin, whose every step lasts at least STEP_S (a sleep, which
# no machine shortens; a slower machine only lengthens it). LONG tokens there take at least
# LONG * STEP_S = 90 s, longer than any wait of the tests that use it, and each of them
# ends its generation itself (stop, cancel, disconnect or kill). The stand-in emits a fixed
# token table whatever the prompt, at the sequence's own position in it, so two streams
# started at different times still carry different text.

STEP_S = 0.05  # the paced engine's shortest step (one sequence, a one-token context)
PACE_GPU, PACE_TP = "H100-80GB", 4
LONG = 1800  # tokens: at least 90 s on the paced server (the CPU reference engine: seconds)


def paced_settings(cpu_repository: Path, **overrides) -> Settings:
    """A CPU repository's fill settings with the paced stand-in engine: the session's
    converted checkpoint and limits, each decode step at least STEP_S (the roofline's step
    grows with the batch and the context, so a one-sequence, one-token step is the
    shortest)."""
    record = json.loads((cpu_repository / MARKER).read_text())
    settings = dict(target="cpu", tokenizer_dir=Path(record["tokenizer_dir"]),
                    checkpoint_dir=Path(record["checkpoint_dir"]), max_batch_size=record["max_batch_size"],
                    max_input_len=record["max_input_len"], max_seq_len=record["max_seq_len"],
                    cpu_engine="standin", standin_gpu=PACE_GPU, standin_tp=PACE_TP,
                    standin_pace_scale=STEP_S / decode_step_seconds(PACE_GPU, 1, 1, PACE_TP))
    return Settings(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------
# The field rules


def invalid_values() -> list[tuple[str, object]]:
    """(field, value) pairs that break each rule of mixtral_triton.protocol.FIELDS, derived
    from the table itself: wrong types, each bound and its exclusive edge, the stop limits."""
    cases: list[tuple[str, object]] = []
    for spec in FIELDS:
        name = spec.name
        if spec.kind == "string":
            cases += [(name, ""), (name, 5)]
        elif spec.kind == "boolean":
            cases += [(name, "yes"), (name, 1)]
        elif spec.kind == "stop":
            cases += [(name, 5), (name, [""]), (name, [1]), (name, ["x"] * (MAX_STOPS + 1)),
                      (name, "x" * (MAX_STOP_CHARS + 1))]
        elif spec.kind == "response_format":
            cases += [(name, "json_object"), (name, {"type": "xml"}), (name, {"type": "json_schema"}),
                      (name, {"type": "json_object", "schema": {}})]
        else:
            cases += [(name, "1"), (name, True)]
            if spec.kind == "integer":
                cases.append((name, 1.5))
            else:
                cases.append((name, FLOAT32_MAX * 10))  # finite JSON, not an FP32
            step = 1 if spec.kind == "integer" else 0.5
            if spec.minimum is not None:
                cases.append((name, spec.minimum if spec.exclusive_minimum else spec.minimum - step))
            if spec.maximum is not None:
                cases.append((name, spec.maximum if spec.exclusive_maximum else spec.maximum + step))
    return cases


def case_id(case) -> str:
    name, value = case
    return f"{name}={str(value)[:20]}"


# ---------------------------------------------------------------------------------------
# The engine's request gauge


def active_requests(server) -> float:
    """The engine's `nv_trt_llm_request_metrics{request_type="active"}` gauge."""
    with urllib.request.urlopen(f"http://{server.host}:{server.ports.metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(r'^nv_trt_llm_request_metrics\{[^}]*request_type="active"[^}]*\} (\S+)$',
                      text, re.MULTILINE)
    assert match, "the engine's active-request gauge is missing"
    return float(match.group(1))


def wait_active(server, predicate, timeout_s: float = 10.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        value = active_requests(server)
        if predicate(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def greedy_whole(server, max_tokens: int = 24, prompt: str = PROMPT) -> Completion:
    """The ensemble's own non-streamed answer (stream=False on the wire), greedy."""
    return PredictClient(server.grpc_url).predict(prompt, stream=False, max_tokens=max_tokens,
                                                  temperature=0)


# ---------------------------------------------------------------------------------------
# The gateway in this process


class Gateway:
    """create_app() served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, settings: GatewaySettings, serving: Serving | None = None):
        self.app = create_app(settings, serving)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))  # held, so no other process can take the port
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.socket.close()


@contextlib.contextmanager
def gateway(**settings):
    g = Gateway(GatewaySettings(**settings))
    try:
        yield g
    finally:
        g.stop()


def wait_gateway_ready(url: str, timeout_s: float = 60.0) -> int:
    """GET {url}/ready until it answers 200 (its probe of Triton has a 2 s limit, which one
    probe may miss on a loaded machine; a gateway or server that is down never answers 200):
    the last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = requests.get(f"{url}/ready", timeout=10).status_code
        if status == 200 or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def metric(g: Gateway, prefix: str) -> float:
    text = requests.get(f"{g.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


def wait_metric(g: Gateway, prefix: str, predicate, timeout_s: float = 5.0) -> float:
    """A gateway metric once it satisfies predicate (a generation's slot is given back
    just after its last byte, when its gRPC stream has closed)."""
    deadline = time.monotonic() + timeout_s
    while not predicate(value := metric(g, prefix)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


# ---------------------------------------------------------------------------------------
# Raw gRPC streams (tritonclient as is, past our client's checks)


def raw_inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """gRPC inputs of any numpy dtype (INT64, FP64 ... too: to send what a model refuses)."""
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@dataclass
class RawStream:
    """One request on its own gRPC stream, read by tritonclient's callback thread."""

    url: str
    model: str
    arrays: dict[str, np.ndarray]
    request_id: str = ""
    outputs: list | None = None
    responses: queue.Queue = field(default_factory=queue.Queue)

    def __post_init__(self):
        self.client = grpcclient.InferenceServerClient(self.url)
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        try:
            self.client.async_stream_infer(self.model, raw_inputs(self.arrays), request_id=self.request_id,
                                           outputs=self.outputs, enable_empty_final_response=True)
        except BaseException:  # an open stream would hold the server's shutdown
            self.close(cancel=True)
            raise

    def next(self, timeout_s: float = 60.0):
        """(result, error) of the next response."""
        return self.responses.get(timeout=timeout_s)

    def read_all(self, timeout_s: float = 60.0):
        """Every response up to the final one: (results, error or None)."""
        results = []
        deadline = time.monotonic() + timeout_s
        while True:
            result, error = self.next(max(0.1, deadline - time.monotonic()))
            if error is not None:
                return results, error
            results.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return results, None

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def raw_stream(url: str, model: str, arrays: dict[str, np.ndarray], request_id: str = "",
               outputs=None, timeout_s: float = 60.0):
    """All responses of one request: (results, error or None)."""
    stream = RawStream(url, model, arrays, request_id, outputs)
    try:
        return stream.read_all(timeout_s)
    finally:
        stream.close()


def text_of(results) -> str:
    """The ensemble's text over its responses (the empty final marker carries none)."""
    return b"".join(r.as_numpy("text_output").reshape(-1)[0] for r in results
                    if r.get_response().outputs).decode("utf-8")


def ensemble_arrays(prompt: bytes | str = PROMPT, max_tokens: int = 4, **extra) -> dict[str, np.ndarray]:
    """The ensemble's tensors for one request, batch of one; `extra` are numpy arrays."""
    if isinstance(prompt, str):
        prompt = prompt.encode("utf-8")
    return {"text_input": np.array([[prompt]], dtype=object),
            "max_tokens": np.array([[max_tokens]], np.int32), **extra}


class Reader(threading.Thread):
    """Consumes a stream until it ends; records when and how."""

    def __init__(self, chunks):
        super().__init__(daemon=True)
        self.chunks = chunks
        self.received = []
        self.error: Exception | None = None
        self.ended_at: float | None = None
        self.started_streaming = threading.Event()

    def run(self):
        try:
            for chunk in self.chunks:
                self.received.append(chunk)
                self.started_streaming.set()
        except Exception as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.started_streaming.set()


# ---------------------------------------------------------------------------------------
# Load-testing tools in their own venvs (scripts/tools-venv.sh), and their reports


def tool_venv(name: str) -> Path:
    """.venv-NAME, made or found up to date by the project's own script (first run: minutes)."""
    root = Path(__file__).resolve().parents[1]
    made = subprocess.run([str(root / "scripts" / "tools-venv.sh"), name], capture_output=True, text=True,
                          timeout=1200)
    assert made.returncode == 0, made.stdout + made.stderr
    return root / f".venv-{name}"


@contextlib.contextmanager
def short_tmpdir():
    """A fresh folder right under /tmp, removed afterwards: TMPDIR for a tool that makes Unix
    sockets there. aiperf's ZMQ IPC paths must fit sockaddr_un's 107 bytes, which a folder
    under pytest's tmp_path can exceed (then aiperf logs the error, writes no report, and
    still exits 0)."""
    path = Path(tempfile.mkdtemp(prefix="t-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def templated_tokens(tokenizer_dir: Path, conversations: list[list[dict]]) -> list[int]:
    """How many tokens each conversation is as the checkpoint's chat template renders it."""
    from transformers import AutoTokenizer  # seconds to import; only this test needs it

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [len(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
            for messages in conversations]


def same_stats(reported: dict, values: list[int]) -> None:
    """A tool's avg/min/max of a per-request figure are those of `values`."""
    assert (reported["min"], reported["max"]) == (min(values), max(values)), (reported, values)
    assert reported["avg"] == pytest.approx(statistics.mean(values)), (reported, values)


def text_tokens(tokenizer_dir: Path, texts: list[str]) -> list[int]:
    """How many tokens each text is under the tokenizer, without special tokens: how
    genai-perf and aiperf count what they sent and received."""
    from transformers import AutoTokenizer  # seconds to import; only the tool tests need it

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [len(tokenizer.encode(text, add_special_tokens=False)) for text in texts]
