"""Start Triton Inference Server on a model repository: the wheel's CPU server here, or the
NGC TensorRT-LLM container's server on a GPU host (orchestrator mode: one process; leader
mode: under mpirun)."""

from mixtral_triton.launcher.cpu import TritonServer, cpu_server_command
from mixtral_triton.launcher.gpu import mpi_server_command, orchestrator_server_command
from mixtral_triton.launcher.ports import Ports, free_ports

__all__ = ["Ports", "TritonServer", "cpu_server_command", "free_ports", "mpi_server_command",
           "orchestrator_server_command"]
