"""The GPU launch: the NGC `tritonserver:26.07-trtllm-python-py3` server under mpirun, in
the TensorRT-LLM backend's leader mode.

One MPI rank per GPU, each a full `tritonserver` process on the same repository. Rank 0
loads every model and serves; ranks 1..N-1 load only the engine model, whose load never
returns on those ranks (they become the executor's workers), so they never open the ports
they are given. Each rank gets its own Python-backend shared-memory prefix so their stubs'
regions do not collide in /dev/shm.
"""

from __future__ import annotations

from pathlib import Path

from mixtral_triton.errors import UserError
from mixtral_triton.launcher.ports import GRPC_URL_ENV, Ports

NGC_TRITONSERVER = "/opt/tritonserver/bin/tritonserver"
ENGINE_MODEL = "tensorrt_llm"


def mpi_server_command(model_repository: Path, world_size: int, ports: Ports,
                       tritonserver: str = NGC_TRITONSERVER, exit_timeout_s: int = 30,
                       engine_model: str = ENGINE_MODEL) -> list[str]:
    if not 1 <= world_size <= 64:
        raise UserError(f"--world-size must be between 1 and 64, got {world_size}")
    # The serving models reach the engine through the server's own gRPC endpoint (rank 0).
    command = ["mpirun", "--allow-run-as-root", "-x", f"{GRPC_URL_ENV}=127.0.0.1:{ports.grpc}"]
    for rank in range(world_size):
        if rank:
            command.append(":")
        command += ["-n", "1", tritonserver, f"--model-repository={model_repository}",
                    f"--http-port={ports.http}", f"--grpc-port={ports.grpc}",
                    f"--metrics-port={ports.metrics}", f"--exit-timeout-secs={exit_timeout_s}",
                    "--disable-auto-complete-config",
                    f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if rank:
            command += ["--model-control-mode=explicit", f"--load-model={engine_model}"]
    return command
