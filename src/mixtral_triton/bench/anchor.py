"""The anchor: NVIDIA's own text pipeline (tensorrtllm_backend, tag v0.19.0,
all_models/inflight_batcher_llm: preprocessing, postprocessing, ensemble) rebuilt in a
scratch model repository around this project's stand-in engine as `tensorrt_llm`, so that
its per-token cost can be measured beside ours with the same engine behind both.

The anchor is read from a copy the benchmark is given (`--anchor PATH`: a checkout, or a
git directory holding the tag), never committed here. Its config templates are filled the
way its tools/fill_template.py would, with its defaults of one preprocessing and one
postprocessing instance. Two of its ensemble's input names for `tensorrt_llm` are spelled
as TensorRT-LLM 1.2.1 spells them (min_length -> min_tokens, random_seed -> seed), since
the stand-in declares the 1.2.1 contract; nothing else of it changes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from mixtral_triton.errors import UserError

ANCHOR_REPOSITORY = "triton-inference-server/tensorrtllm_backend"
ANCHOR_TAG = "v0.19.0"
ANCHOR_MODELS = "all_models/inflight_batcher_llm"
MODELS = ("preprocessing", "postprocessing", "ensemble")
FILES = tuple(f"{m}/config.pbtxt" for m in MODELS) + ("preprocessing/1/model.py", "postprocessing/1/model.py")
# The anchor ensemble's tensorrt_llm input names (v0.19.0) -> TensorRT-LLM 1.2.1's.
RENAMED_ENGINE_INPUTS = {"min_length": "min_tokens", "random_seed": "seed"}


def _git(path: Path, *args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def read_anchor(path: Path) -> tuple[dict[str, str], dict]:
    """The anchor's files (relative to inflight_batcher_llm) and where they came from: the
    tag in a git directory when it holds it, else the files of a checkout as they are."""
    path = Path(path)
    if _git(path, "rev-parse", "--verify", "--quiet", f"{ANCHOR_TAG}^{{commit}}") is not None:
        files = {}
        for name in FILES:
            text = _git(path, "show", f"{ANCHOR_TAG}:{ANCHOR_MODELS}/{name}")
            if text is None:
                raise UserError(f"--anchor {path}: {ANCHOR_TAG} has no {ANCHOR_MODELS}/{name}")
            files[name] = text
        commit = _git(path, "rev-parse", f"{ANCHOR_TAG}^{{commit}}").strip()
        return files, {"source": str(path), "tag": ANCHOR_TAG, "commit": commit}
    folder = path / ANCHOR_MODELS
    if not folder.is_dir():
        raise UserError(f"--anchor {path} is neither a git directory holding tag {ANCHOR_TAG} nor a "
                        f"tensorrtllm_backend checkout (no {ANCHOR_MODELS})")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"--anchor {path}: {ANCHOR_MODELS} lacks {', '.join(missing)}")
    described = _git(path, "describe", "--tags", "--always", "--dirty")
    return ({name: (folder / name).read_text(encoding="utf-8") for name in FILES},
            {"source": str(path), "tag": described.strip() if described else "unknown (not a git checkout)",
             "commit": (_git(path, "rev-parse", "HEAD") or "").strip() or None})


def fill(template: str, values: dict[str, str]) -> str:
    """Replace every ${name}; a placeholder without a value is an error (its model would not load)."""
    def value(match: re.Match) -> str:
        if match.group(1) not in values:
            raise UserError(f"the anchor's config needs a value for ${{{match.group(1)}}}")
        return values[match.group(1)]

    return re.sub(r"\$\{(\w+)\}", value, template)


def rename_engine_inputs(ensemble_config: str) -> str:
    for old, new in RENAMED_ENGINE_INPUTS.items():
        ensemble_config = ensemble_config.replace(f'key: "{old}"', f'key: "{new}"')
    return ensemble_config


def build_anchor_repository(anchor: Path, standin_repository: Path, tokenizer_dir: Path, out: Path,
                            triton_max_batch_size: int) -> tuple[Path, dict]:
    """A scratch repository in `out`: the anchor's three models, filled, and the stand-in's
    `tensorrt_llm` folder copied from `standin_repository` (a filled CPU repository)."""
    files, source = read_anchor(anchor)
    values = {"tokenizer_dir": str(tokenizer_dir), "triton_max_batch_size": str(triton_max_batch_size),
              "preprocessing_instance_count": "1", "postprocessing_instance_count": "1",
              "add_special_tokens": "true", "skip_special_tokens": "true",
              "max_queue_delay_microseconds": "0", "max_queue_size": "0", "logits_datatype": "TYPE_FP32",
              "engine_dir": "", "multimodal_model_path": "", "max_num_images": ""}
    if out.exists():
        shutil.rmtree(out)
    for name, text in files.items():
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("config.pbtxt"):
            text = fill(text, values)
            if name.startswith("ensemble/"):
                text = rename_engine_inputs(text)
        target.write_text(text, encoding="utf-8")
    (out / "ensemble" / "1").mkdir(parents=True, exist_ok=True)
    shutil.copytree(standin_repository / "tensorrt_llm", out / "tensorrt_llm")
    return out, {**source, "filled": {k: v for k, v in values.items() if v}}
