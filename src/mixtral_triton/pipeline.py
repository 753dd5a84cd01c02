"""One command from a Hugging Face checkpoint folder to a filled model repository.

cpu: convert (TP-sharded TensorRT-LLM checkpoint) -> fill the CPU repository, whose
     reference engine computes from that checkpoint.
gpu: convert -> trtllm-build (printed, not run, where TensorRT-LLM is not installed)
     -> fill the GPU repository pointing at the engine folder.
Every step is resumable: a rerun skips the converted, verified ranks.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from pathlib import Path

from mixtral_triton.convert.layout import SourceCheckpoint
from mixtral_triton.convert.mapping import check_model, resolve
from mixtral_triton.convert.writer import convert
from mixtral_triton.errors import OneLineArgumentParser, UserError, one_line_errors
from mixtral_triton.repository.fill import CPU_ENGINES, Settings, fill_repository
from mixtral_triton.standin import Pacing


def build_repository(checkpoint: Path, work_dir: Path, target: str = "cpu", tp: int = 4,
                     max_batch_size: int = 8, max_input_len: int = 1024, max_seq_len: int = 2048,
                     gpu: str = "H100-80GB", standin: Pacing | None = None, log=print) -> Path:
    """``standin`` (cpu only): fill the engine model with the paced table stand-in of
    mixtral_triton.standin instead of the reference model (load tests)."""
    checkpoint, work_dir = Path(checkpoint).resolve(), Path(work_dir).resolve()
    if not (checkpoint / "config.json").is_file():
        raise UserError(f"{checkpoint} is not a Hugging Face checkpoint folder (no config.json)")
    trtllm_checkpoint = work_dir / f"trtllm-checkpoint-tp{tp}"
    engine_dir = work_dir / f"engine-tp{tp}"
    settings = dict(target=target, tokenizer_dir=checkpoint, max_input_len=max_input_len,
                    max_seq_len=max_seq_len)
    if target == "cpu":
        settings.update(checkpoint_dir=trtllm_checkpoint, max_batch_size=max_batch_size)
    else:
        settings.update(engine_dir=engine_dir)
    if standin is not None:  # Settings refuses it for any target but cpu
        settings.update(cpu_engine="standin", standin_gpu=standin.gpu, standin_tp=standin.tp,
                        standin_pace_scale=standin.scale)
    settings = Settings(**settings)
    settings.validate_limits()  # a bad option is refused before the conversion, not after
    parallel = resolve(tp=tp)
    check_model(parallel, SourceCheckpoint(checkpoint).model)  # e.g. a TP that cannot split it
    work_dir.mkdir(parents=True, exist_ok=True)
    convert(checkpoint, trtllm_checkpoint, parallel=parallel, log=log)
    if target != "cpu":
        _engine(trtllm_checkpoint, engine_dir, gpu, max_input_len, max_seq_len - max_input_len, log)
    repository = fill_repository(settings, work_dir / f"model_repository-{target}")
    log(f"model repository ready: {repository}")
    return repository


def _engine(trtllm_checkpoint: Path, engine_dir: Path, gpu: str, max_input_len: int,
            max_output_len: int, log) -> None:
    """Build the engine (or print how)."""
    from mixtral_triton.trtllm_build import prepare_build, run_build

    build = prepare_build(trtllm_checkpoint, engine_dir, gpu, max_input_len, max_output_len, 1)
    if (engine_dir / "config.json").is_file():
        log(f"engine already built: {engine_dir}")
    elif shutil.which("trtllm-build") is None:
        log("trtllm-build is not installed here: build the engine inside "
            f"nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 with:\n  {shlex.join(build.command)}")
        engine_dir.mkdir(parents=True, exist_ok=True)
    else:
        log(run_build(build))


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="mixtral-triton-build",
                                description="Checkpoint folder -> filled Triton model repository.")
    p.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint folder (safetensors)")
    p.add_argument("--work-dir", type=Path, required=True,
                   help="where the converted checkpoint, engine and repository go")
    p.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--tp", type=int, default=4, help="tensor parallel size (default 4)")
    p.add_argument("--max-batch-size", type=int, default=8, help="cpu: the reference engine's batch")
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--gpu", default="H100-80GB", help="gpu: the capacity plan's GPU type")
    p.add_argument("--cpu-engine", choices=CPU_ENGINES, default="reference",
                   help="cpu: the reference model, or the paced table stand-in for load tests")
    p.add_argument("--standin-gpu", default="H100-80GB", help="cpu standin: the GPU whose decode pace it keeps")
    p.add_argument("--standin-pace-scale", type=float, default=1.0,
                   help="cpu standin: x that GPU's roofline step time (0: no waiting; default 1)")
    args = p.parse_args(argv)
    standin = (Pacing(args.standin_gpu, args.tp, args.standin_pace_scale)
               if args.cpu_engine == "standin" else None)
    build_repository(args.checkpoint, args.work_dir, args.target, args.tp, args.max_batch_size,
                     args.max_input_len, args.max_seq_len, args.gpu, standin)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
