"""GPU smoke test, for NVIDIA hardware with TensorRT-LLM 1.2.1 (the NGC image
tritonserver:26.07-trtllm-python-py3): convert the tiny fixture at tp 1, build a real
engine through the trtllm-build wrapper, run it with TensorRT-LLM's C++ runtime
(tensorrt_llm.runtime.ModelRunnerCpp) and compare its greedy tokens with transformers'
generate on the same checkpoint; then serve it as users do, `tritonserver` in orchestrator
mode started the way the launcher starts it for the image's Open MPI (bare, or under
`mpirun -n 1`), on a filled GPU repository, at TP=1 and, with two GPUs or more, TP=2; stream
through the ensemble, and stop it with SIGTERM. The spawned workers are checked by what they do
(each holds the engine on its own GPU, seen by nvidia-smi), not by their parent: where Open MPI
starts them they are children of its daemon, not of the server. None of this has run on a GPU
in this project.

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

from mixtral_triton.gpu_acceptance import gpu_memory_by_process
from mixtral_triton.launcher.gpu import NGC_TRITONSERVER, server_invocation, serving_rank
from mixtral_triton.launcher.ports import free_ports
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


def _build_tiny_engine(tiny_checkpoint, work: Path, tp: int) -> Path:
    from mixtral_triton.convert.mapping import resolve
    from mixtral_triton.convert.writer import convert

    convert(tiny_checkpoint, work / "ckpt", parallel=resolve(tp=tp), dtype="float16")
    # The plan only sizes the engine's limits here: the tiny model fits any of the GPU types,
    # so the smallest is named whatever this machine has.
    return run_build(prepare_build(work / "ckpt", work / "engine", "A100-40GB",
                                   max_input_len=64, max_output_len=NEW_TOKENS, workers=tp))


@pytest.fixture(scope="module")
def engine_dir(tiny_checkpoint, tmp_path_factory):
    return _build_tiny_engine(tiny_checkpoint, tmp_path_factory.mktemp("gpu"), 1)


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


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def orchestrator_server(request, engine_dir, tiny_checkpoint, tmp_path_factory):
    """The filled GPU repository served the way the image and the pod serve it: one tritonserver
    process with TRTLLM_ORCHESTRATOR=1, started as the launcher starts it for this image's Open
    MPI, spawning the engine's workers itself (TP=1, and TP=2 on two GPUs)."""
    if not Path(NGC_TRITONSERVER).exists():
        pytest.skip(f"{NGC_TRITONSERVER} is not here (run in the NGC image)")
    tp = request.param
    if torch.cuda.device_count() < tp:
        pytest.skip(f"TP={tp} needs {tp} GPUs, this machine has {torch.cuda.device_count()}")
    from mixtral_triton.repository import Settings, fill_repository

    work = tmp_path_factory.mktemp(f"serve-tp{tp}")
    engine = engine_dir if tp == 1 else _build_tiny_engine(tiny_checkpoint, work / "build", tp)
    repo = fill_repository(Settings(target="gpu", tokenizer_dir=tiny_checkpoint, engine_dir=engine,
                                    triton_max_batch_size=4, max_input_len=64, max_seq_len=64 + NEW_TOKENS,
                                    kv_cache_free_gpu_mem_fraction=0.1,
                                    gpu_device_ids=",".join(map(str, range(tp)))), work / "repo")
    ports = free_ports()
    log = work / "triton.log"
    _, env, command = server_invocation("orchestrator", "auto", repo, tp, ports, exit_timeout_s=EXIT_TIMEOUT_S)
    with open(log, "wb") as out:
        launched = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not _ready(ports.http):
            assert launched.poll() is None, f"the server exited with {launched.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready after {LOAD_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        # The serving tritonserver: the process itself when bare, the rank below mpirun otherwise.
        server_pid = launched.pid if command[0] != "mpirun" else serving_rank(launched.pid)
        yield launched, server_pid, tp, ports, log
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
            launched.wait()


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


def _workers(server_pid: int, tp: int) -> dict[int, int]:
    """GPU -> the process other than the server that holds the most memory there: the worker
    that loaded its rank of the engine (nvidia-smi; whoever its parent is)."""
    gpus = gpu_memory_by_process()
    found = {}
    for index in range(tp):
        others = {pid: mib for pid, mib in gpus[index]["processes"].items() if pid != server_pid}
        if others:
            found[index] = max(others, key=others.get)
    return found


def test_orchestrator_mode_serves_streams_and_drains_on_sigterm(orchestrator_server):
    from mixtral_triton.client import PredictClient
    from mixtral_triton.protocol import parse_request

    launched, server_pid, tp, ports, log = orchestrator_server
    # One spawned worker per GPU holds its rank of the engine; the server is none of them.
    workers = _workers(server_pid, tp)
    assert sorted(workers) == list(range(tp)) and len(set(workers.values())) == tp, (workers, log.read_text()[-4000:])
    assert all(_argv0(pid).endswith("trtllmExecutorWorker") for pid in workers.values())

    client = PredictClient(f"127.0.0.1:{ports.grpc}", timeout_s=120)
    request = parse_request({"prompt": PROMPTS[1], "max_tokens": NEW_TOKENS, "temperature": 0})
    chunks = list(client.generate(request))
    assert len(chunks) > 1, "the responses did not stream"
    assert chunks[-1].finish_reason in ("length", "stop") and 0 < chunks[-1].completion_tokens <= NEW_TOKENS
    # The engine's iteration statistics reach the server: the gauge the autoscaler reads.
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.metrics}/metrics", timeout=10) as reply:
        assert 'nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active"' in reply.read().decode()

    # SIGTERM to the serving tritonserver with a stream in flight (what the launcher does, also
    # below mpirun): the stream ends normally, then the server, its workers and mpirun exit.
    stream = client.generate(request)
    first = next(stream)
    os.kill(server_pid, signal.SIGTERM)
    rest = list(stream)
    assert (rest or [first])[-1].finish_reason in ("length", "stop")
    assert launched.wait(EXIT_TIMEOUT_S + 30) == 0, log.read_text()[-4000:]
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in workers.values()):
        assert time.monotonic() < deadline, "an executor worker outlived the server"
        time.sleep(0.5)
