"""Fill the Triton model repository for a target from the templates in model_repository/.

The templates are never edited: the filled repository is assembled in a hidden folder
next to the output and then renamed into place, so Triton never sees half of one. Every
filled config.pbtxt must parse as Triton's ModelConfig with no `${...}` left, and the
ensemble's wiring must be consistent, before anything is written. `postprocessing` is the
C++ detokenizer backend (mixtral_triton.cpp_detokenizer): the fill compiles it (once per
version of its sources, cached) and puts the library and the token tables in its folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tritonclient.grpc.model_config_pb2 import ModelConfig

from mixtral_triton import cpp_detokenizer
from mixtral_triton.errors import UserError
from mixtral_triton.standin import Pacing
from mixtral_triton.repository.pbtxt import parse_config
from mixtral_triton.repository.wiring import wiring_problems

# Served model name -> template folder. Only the engine differs between targets, so the
# ensemble, the tokenizer and the detokenizer are the same on CPU and GPU.
MODELS = {
    "gpu": {"ensemble": "ensemble", "preprocessing": "preprocessing",
            "tensorrt_llm": "tensorrt_llm", "postprocessing": "postprocessing"},
    "cpu": {"ensemble": "ensemble", "preprocessing": "preprocessing",
            "tensorrt_llm": "tensorrt_llm_reference", "postprocessing": "postprocessing"},
}
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
# cpu: what the tensorrt_llm model steps: the reference model computing from the checkpoint,
# or the paced table stand-in of mixtral_triton.standin (load tests).
CPU_ENGINES = ("reference", "standin")
LOGITS_DATATYPES = ("TYPE_FP32", "TYPE_FP16", "TYPE_BF16")
# Written into every filled repository; only a folder holding it (or an empty one) is
# ever replaced, so a mistyped --out cannot wipe unrelated files.
MARKER = ".mixtral-triton-fill.json"
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


def default_templates() -> Path:
    """model_repository/ of this checkout (the package is installed editable)."""
    return Path(__file__).resolve().parents[3] / "model_repository"


@dataclass(frozen=True)
class Settings:
    """Everything the templates need. Field names are the placeholder names."""

    target: str
    tokenizer_dir: Path
    engine_dir: Path | None = None  # gpu: the trtllm-build output
    checkpoint_dir: Path | None = None  # cpu: the TensorRT-LLM checkpoint the engine is built from
    triton_max_batch_size: int = 64  # Triton's batch limit for every model
    max_batch_size: int = 8  # cpu: the reference engine's in-flight batch (an engine has its own)
    max_input_len: int = 2048  # must not exceed the engine's build limits
    max_seq_len: int = 4096
    max_beam_width: int = 1
    kv_cache_free_gpu_mem_fraction: float = 0.9
    batch_scheduler_policy: str = "guaranteed_no_evict"
    enable_chunked_context: bool = True
    enable_kv_cache_reuse: bool = True
    max_queue_size: int = 0  # 0: unbounded
    # gpu: how often the engine looks for cancelled requests; the capacity plan's value is one
    # decode step (mixtral_triton.capacity), 100 is TensorRT-LLM's default.
    cancellation_check_period_ms: int = 100
    logits_datatype: str = "TYPE_FP32"  # the engine's logits type (trtllm-build --logits_dtype)
    # gpu: the CUDA devices of the engine's ranks, one per rank (TP 4 on a 4-GPU node or pod).
    gpu_device_ids: str = "0,1,2,3"
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    preprocessing_instance_count: int = 1
    cpu_engine: str = "reference"
    standin_gpu: str = "H100-80GB"  # the stand-in's decode steps last as long as this GPU's
    standin_tp: int = 4
    standin_pace_scale: float = 1.0  # x the roofline step time; 0: no waiting

    def validate(self) -> None:
        self.validate_limits()
        _require_dir("tokenizer directory", self.tokenizer_dir)
        if not any((self.tokenizer_dir / f).is_file()
                   for f in ("tokenizer.json", "tokenizer.model")):
            raise UserError(f"no tokenizer.json or tokenizer.model in {self.tokenizer_dir}")
        wanted, unwanted = (("engine_dir", "checkpoint_dir") if self.target == "gpu"
                            else ("checkpoint_dir", "engine_dir"))
        if getattr(self, unwanted) is not None:
            raise UserError(f"--{_flag(unwanted)} does not apply to --target {self.target}")
        if getattr(self, wanted) is None:
            raise UserError(f"--target {self.target} needs --{_flag(wanted)}")
        _require_dir(wanted.replace("_", " "), getattr(self, wanted))

    def validate_limits(self) -> None:
        """The checks that need no folder (the target, the limits, the choices): a build can
        make them before it writes the checkpoint and the engine the folders hold."""
        if self.target not in MODELS:
            raise UserError(f"unknown target {self.target!r}: choose one of {', '.join(MODELS)}")
        for name in ("triton_max_batch_size", "max_batch_size", "max_input_len", "max_seq_len",
                     "max_beam_width", "preprocessing_instance_count", "cancellation_check_period_ms"):
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.max_queue_size < 0:
            raise UserError(f"--max-queue-size must not be negative, got {self.max_queue_size}")
        if self.max_input_len >= self.max_seq_len:
            raise UserError(f"--max-input-len ({self.max_input_len}) must be below --max-seq-len "
                            f"({self.max_seq_len}) to leave room for output")
        if not 0 < self.kv_cache_free_gpu_mem_fraction <= 1:
            raise UserError("--kv-cache-free-gpu-mem-fraction must be in (0, 1], got "
                            f"{self.kv_cache_free_gpu_mem_fraction}")
        if self.batch_scheduler_policy not in SCHEDULER_POLICIES:
            raise UserError(f"unknown batch scheduler policy {self.batch_scheduler_policy!r}: "
                            f"choose one of {', '.join(SCHEDULER_POLICIES)}")
        ids = self.gpu_device_ids.split(",")
        if not all(re.fullmatch(r"\d+", i) for i in ids) or len(set(map(int, ids))) != len(ids):
            raise UserError("--gpu-device-ids must be distinct GPU numbers separated by commas "
                            f"(one per engine rank, e.g. 0,1,2,3), got {self.gpu_device_ids!r}")
        if self.cpu_engine not in CPU_ENGINES:
            raise UserError(f"unknown --cpu-engine {self.cpu_engine!r}: choose one of {', '.join(CPU_ENGINES)}")
        if self.target != "cpu" and self.cpu_engine != "reference":
            raise UserError(f"--cpu-engine {self.cpu_engine} applies to --target cpu only")
        if self.cpu_engine == "standin":
            Pacing(self.standin_gpu, self.standin_tp, self.standin_pace_scale)  # refuses a bad GPU or scale
        if self.logits_datatype not in LOGITS_DATATYPES:
            raise UserError(f"unknown logits data type {self.logits_datatype!r}: "
                            f"choose one of {', '.join(LOGITS_DATATYPES)}")

    def values(self) -> dict[str, str]:
        """Placeholder name -> text, escaped for use inside a quoted pbtxt string."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue  # the other target's folder; a template asking for it is an error
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, Path):
                text = str(value.resolve())  # Triton resolves relative paths from its own cwd
            else:
                text = str(value)
            out[f.name] = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return out


def fill_text(text: str, values: dict[str, str], source: str | Path) -> str:
    """Replace every `${name}` in `text`; any name without a value is an error."""

    def substitute(match: re.Match) -> str:
        if match.group(1) not in values:
            raise UserError(f"{source}:{_line(text, match.start())}: no value for placeholder "
                            f"{match.group(0)}")
        return values[match.group(1)]

    filled = _PLACEHOLDER.sub(substitute, text)
    if "${" in filled:
        raise UserError(f"{source}:{_line(filled, filled.index('${'))}: unterminated placeholder")
    return filled


# The model that is the C++ detokenizer backend (its template names that backend).
DETOKENIZER_MODEL = "postprocessing"


def fill_repository(settings: Settings, out: Path, templates: Path | None = None,
                    library_cache: Path | None = None) -> Path:
    """Write the filled repository for settings.target to `out`, replacing a previous fill.

    `library_cache`: where the C++ detokenizer is compiled and kept (default: the user's cache
    folder, cpp_detokenizer.default_cache_dir)."""
    settings.validate()
    templates = (templates or default_templates()).resolve()
    out = out.resolve()
    if out == templates or templates.is_relative_to(out) or out.is_relative_to(templates):
        raise UserError(f"--out {out} overlaps the templates in {templates}")
    _check_replaceable(out)

    values = settings.values()
    filled: dict[str, str] = {}
    configs: dict[str, ModelConfig] = {}
    for model, folder in MODELS[settings.target].items():
        template = templates / folder / "config.pbtxt"
        if not template.is_file():
            raise UserError(f"missing template {template}")
        filled[model] = fill_text(template.read_text(), values, template)
        configs[model] = parse_config(filled[model], template)
        if configs[model].name != model:
            raise UserError(f"{template}: model is named {configs[model].name!r}, but it is "
                            f"served as {model!r}")
    problems = wiring_problems(configs)
    if problems:
        raise UserError("inconsistent ensemble wiring:\n  " + "\n  ".join(problems))
    if configs[DETOKENIZER_MODEL].backend != cpp_detokenizer.BACKEND:
        raise UserError(f"{templates / MODELS[settings.target][DETOKENIZER_MODEL] / 'config.pbtxt'}: "
                        f"{DETOKENIZER_MODEL} must be the {cpp_detokenizer.BACKEND!r} backend, got "
                        f"{configs[DETOKENIZER_MODEL].backend!r}")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for model, folder in MODELS[settings.target].items():
            # model.py and version folders travel as they are; only configs are filled.
            shutil.copytree(templates / folder, staging / model, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("config.pbtxt", "__pycache__"))
            (staging / model / "config.pbtxt").write_text(filled[model])
        cpp_detokenizer.install(staging / DETOKENIZER_MODEL, settings.tokenizer_dir, library_cache)
        record = {k: str(v.resolve()) if isinstance(v, Path) else v
                  for k, v in asdict(settings).items()}
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        _replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def sources_digest(templates: Path | None = None) -> str:
    """A hash of everything a fill copies besides its settings: the templates and the C++
    detokenizer's sources. deploy/build-job.sh fills again when it changes (a new image)."""
    templates = (templates or default_templates()).resolve()
    digest = hashlib.sha256(cpp_detokenizer.sources_digest().encode())
    for path in sorted(p for p in templates.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(templates)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"refusing to replace {out}: it is not empty and was not written by "
                        f"this tool (no {MARKER})")


def _replace(staging: Path, out: Path) -> None:
    """Swap the staged folder in: two renames, so `out` is never partly written."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(staging, out)
    shutil.rmtree(old)


def _require_dir(what: str, path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"{what} {path} does not exist or is not a folder")


def _flag(field_name: str) -> str:
    return field_name.replace("_", "-")


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1
