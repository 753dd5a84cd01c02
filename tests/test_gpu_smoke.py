"""GPU smoke test, for NVIDIA hardware with TensorRT-LLM 1.2.1 (the NGC image
tritonserver:26.07-trtllm-python-py3): convert the tiny fixture at tp 1, build a real
engine through the trtllm-build wrapper, run it with TensorRT-LLM's C++ runtime
(tensorrt_llm.runtime.ModelRunnerCpp) and compare its greedy tokens with transformers'
generate on the same checkpoint; then serve it as users do, the plain `tritonserver` in
orchestrator mode on a filled GPU repository, stream through the ensemble, and stop it with
SIGTERM.

    python3 -m pytest -m gpu tests/test_gpu_smoke.py

Skipped, with the reason, where TensorRT-LLM or a GPU is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from mixtral_triton.launcher.gpu import NGC_TRITONSERVER, orchestrator_environment, orchestrator_server_command
from mixtral_triton.launcher.ports import free_ports
from mixtral_triton.launcher.shutdown import descendants
from mixtral_triton.trtllm_build import BUILD_RECORD, TRTLLM_BUILD, prepare_build, run_build

EOS = 2  # the fixture's eos_token_id
NEW_TOKENS = 16
PROMPTS = ["The capital of France is", "Mixtral routes every token to two of its eight experts, so"]


def _missing() -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not importable (run in the NGC image tritonserver:26.07-trtllm-python-py3)"
    if shutil.which(TRTLLM_BUILD) is None:
        return f"{TRTLLM_BUILD} is not on PATH"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


MISSING = _missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


def _until_eos(tokens: list[int]) -> list[int]:
    # Whether a runtime keeps the end token it stopped at differs; the tokens before it must not.
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


@pytest.fixture(scope="module")
def engine_dir(tiny_checkpoint, tmp_path_factory):
    from mixtral_triton.convert.mapping import resolve
    from mixtral_triton.convert.writer import convert

    work = tmp_path_factory.mktemp("gpu")
    convert(tiny_checkpoint, work / "ckpt", parallel=resolve(tp=1), dtype="float16")
    # The plan only sizes the engine's limits here: the tiny model fits any of the GPU types,
    # so the smallest is named whatever this machine has.
    return run_build(prepare_build(work / "ckpt", work / "engine", "A100-40GB",
                                   max_input_len=64, max_output_len=NEW_TOKENS))


def test_engine_folder_is_complete(engine_dir):
    assert (engine_dir / "config.json").is_file()
    assert (engine_dir / "rank0.engine").stat().st_size > 0
    assert (engine_dir / BUILD_RECORD).is_file()


def test_greedy_tokens_match_transformers(engine_dir, tiny_checkpoint):
    from tensorrt_llm.runtime import ModelRunnerCpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]

    runner = ModelRunnerCpp.from_dir(engine_dir=str(engine_dir), rank=0,
                                     kv_cache_free_gpu_memory_fraction=0.1)
    try:
        out = runner.generate([torch.tensor(ids, dtype=torch.int32) for ids in prompts],
                              max_new_tokens=NEW_TOKENS, end_id=EOS, pad_id=EOS, top_k=1,
                              return_dict=True, output_sequence_lengths=True)
    finally:
        runner.session.shutdown()
    # output_ids is [batch, beams, max_seq_len]: the prompt, the new tokens, then end_id padding.
    engine_tokens = [
        _until_eos(out["output_ids"][i, 0, len(ids):int(out["sequence_lengths"][i, 0])].tolist())
        for i, ids in enumerate(prompts)]

    # The fixture's weights keep clear margins between the top tokens, so the float32
    # reference and the fp16 engine choose the same tokens.
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).cuda().eval()
    reference = [
        _until_eos(model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=EOS, pad_token_id=EOS)[0, len(ids):].tolist())
        for ids in prompts]

    assert all(reference), "the reference stopped at once: the comparison would prove nothing"
    assert engine_tokens == reference


EXIT_TIMEOUT_S = 30
LOAD_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def orchestrator_server(engine_dir, tiny_checkpoint, tmp_path_factory):
    """The filled GPU repository served the way the image and the pod serve it: one plain
    tritonserver process with TRTLLM_ORCHESTRATOR=1, spawning the engine's worker itself."""
    if not Path(NGC_TRITONSERVER).exists():
        pytest.skip(f"{NGC_TRITONSERVER} is not here (run in the NGC image)")
    from mixtral_triton.repository import Settings, fill_repository

    work = tmp_path_factory.mktemp("serve")
    repo = fill_repository(Settings(target="gpu", tokenizer_dir=tiny_checkpoint, engine_dir=engine_dir,
                                    triton_max_batch_size=4, max_input_len=64, max_seq_len=64 + NEW_TOKENS,
                                    kv_cache_free_gpu_mem_fraction=0.1, gpu_device_ids="0"), work / "repo")
    ports = free_ports()
    log = work / "triton.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(orchestrator_server_command(repo, 1, ports, exit_timeout_s=EXIT_TIMEOUT_S),
                                  env={**os.environ, **orchestrator_environment()}, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not _ready(ports.http):
            assert server.poll() is None, f"tritonserver exited with {server.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready after {LOAD_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        yield server, ports, log
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _running(pid: int) -> bool:
    """Alive and not a zombie (in a container without an init, nobody reaps orphans)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def test_orchestrator_mode_serves_streams_and_drains_on_sigterm(orchestrator_server):
    from mixtral_triton.client import PredictClient
    from mixtral_triton.protocol import parse_request

    server, ports, log = orchestrator_server
    # The server spawned the engine's executor worker (MPI_Comm_spawn) on GPU 0.
    workers = [pid for pid in descendants(server.pid) if _argv0(pid).endswith("trtllmExecutorWorker")]
    assert workers, "no trtllmExecutorWorker below the server: it is not in orchestrator mode"
    assert "(devices: 0)" in log.read_text()

    client = PredictClient(f"127.0.0.1:{ports.grpc}", timeout_s=120)
    request = parse_request({"prompt": PROMPTS[1], "max_tokens": NEW_TOKENS, "temperature": 0})
    chunks = list(client.generate(request))
    assert len(chunks) > 1, "the responses did not stream"
    assert chunks[-1].finish_reason in ("length", "stop") and 0 < chunks[-1].completion_tokens <= NEW_TOKENS
    # The engine's iteration statistics reach the server: the gauge the autoscaler reads.
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.metrics}/metrics", timeout=10) as reply:
        assert 'nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active"' in reply.read().decode()

    # SIGTERM with a stream in flight: the stream ends normally, then the server and its
    # worker exit.
    stream = client.generate(request)
    first = next(stream)
    server.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert (rest or [first])[-1].finish_reason in ("length", "stop")
    assert server.wait(EXIT_TIMEOUT_S + 30) == 0, log.read_text()[-4000:]
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, "the executor worker outlived the server"
        time.sleep(0.5)
