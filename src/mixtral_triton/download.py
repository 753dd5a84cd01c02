"""Fetch the Hugging Face checkpoint, or take a local folder, and check that it is complete.

Only safetensors weights, the JSON configs and the tokenizer are downloaded. Pickle
checkpoints (*.bin, *.pt, *.pth, *.pkl) are refused: loading one runs whatever code it
carries. Downloads resume where an interrupted one stopped (huggingface_hub keeps partial
files and skips finished ones), with its progress bars.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import struct
from pathlib import Path

from mixtral_triton.errors import UserError, one_line_errors
from mixtral_triton.progress import Progress

MODEL_ID = "mistral-community/Mixtral-8x22B-v0.1"
# model*.safetensors, not *.safetensors: some Mistral repositories also carry the same
# weights in Mistral's own consolidated*.safetensors layout, which would double the download.
WEIGHT_PATTERN = "model*.safetensors"
ALLOW_PATTERNS = [WEIGHT_PATTERN, "*.json", "tokenizer.model"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit


def fetch_checkpoint(source: str = MODEL_ID, local_dir: Path | None = None,
                     revision: str | None = None) -> Path:
    """A checked checkpoint folder: `source` itself if it is a folder, else the hub download."""
    if Path(source).expanduser().exists():
        if local_dir is not None:
            raise UserError("--local-dir only applies to downloads; the local folder is used where it is")
        return check_checkpoint(Path(source).expanduser())
    if source.startswith((".", "/", "~")):
        raise UserError(f"no such folder: {source}")

    # Imported here: the local-folder path needs no network library.
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import (HFValidationError, HTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled)
    try:
        refuse_pickle_only(list_repo_files(source, revision=revision), source)
        # Progress: huggingface_hub's bars on a terminal, plain lines with time left elsewhere.
        folder = snapshot_download(source, revision=revision, local_dir=local_dir,
                                   allow_patterns=ALLOW_PATTERNS, tqdm_class=Progress)
    except (HTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, HFValidationError) as exc:
        raise UserError(f"cannot download {source}: {exc}".splitlines()[0]) from None
    return check_checkpoint(Path(folder))


def refuse_pickle_only(files: list[str], source: str) -> None:
    """Refuse a repository whose weights exist only as pickles, before anything is downloaded."""
    if any(fnmatch.fnmatch(name, WEIGHT_PATTERN) for name in files):
        return
    pickles = [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise UserError(f"{source} has only pickle weights ({pickles[0]}, ...), which run code when "
                        "loaded; use a repository or folder with safetensors weights")
    raise UserError(f"{source} has no {WEIGHT_PATTERN} weights")


def check_checkpoint(folder: Path) -> Path:
    """UserError unless `folder` holds a whole Mixtral checkpoint in safetensors; returns it."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    refuse_pickle_only(names, str(folder))

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} has no readable config.json ({exc})") from None
    if config.get("model_type") != "mixtral":
        raise UserError(f"{folder}/config.json is model_type {config.get('model_type')!r}, not 'mixtral'")
    if not any(name in names for name in TOKENIZER_FILES):
        raise UserError(f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")

    if INDEX in names:
        try:
            weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{folder}/{INDEX} is not a safetensors index ({exc})") from None
        expected: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            expected.setdefault(shard, set()).add(tensor)
    elif "model.safetensors" in names:
        expected = {"model.safetensors": set()}
    else:
        raise UserError(f"{folder} has several safetensors files but no {INDEX}")

    missing = [shard for shard in sorted(expected) if shard not in names]
    if missing:
        raise UserError(f"incomplete checkpoint: {len(missing)} of the {len(expected)} shards that "
                        f"{INDEX} lists are missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                        "run the download again to resume it")
    for shard, tensors in expected.items():
        absent = tensors - _tensor_names(folder / shard)
        if absent:
            raise UserError(f"{shard} lacks {len(absent)} tensors that {INDEX} places there "
                            f"(e.g. {min(absent)})")
    return folder


def _tensor_names(path: Path) -> set[str]:
    """Tensor names from a safetensors header; UserError if the file is cut short.

    Only the header is read: the data's extent is known from it, so a truncated copy shows
    as a file shorter than the header says, without reading gigabytes.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        start = f.read(8)
        length = struct.unpack("<Q", start)[0] if len(start) == 8 else size
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise UserError(f"{path.name} is not a safetensors file or is truncated")
        try:
            header = json.loads(f.read(length))
            tensors = {name: info["data_offsets"][1] for name, info in header.items()
                       if name != "__metadata__"}
        except (ValueError, KeyError, TypeError, IndexError):
            raise UserError(f"{path.name} has an unreadable safetensors header") from None
    if size < 8 + length + max(tensors.values(), default=0):
        raise UserError(f"{path.name} is truncated ({size} bytes, its header needs "
                        f"{8 + length + max(tensors.values())}); run the download again to resume it")
    return set(tensors)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through one_line_errors, not usage + message
        raise UserError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="download_checkpoint.py",
                description="Download the Mixtral checkpoint (safetensors, JSON configs and tokenizer "
                "only; resumes an interrupted download), or check a local checkpoint folder. "
                "Prints the checked folder.")
    p.add_argument("source", nargs="?", default=MODEL_ID,
                   help=f"hub repository id or local folder (default {MODEL_ID})")
    p.add_argument("--local-dir", type=Path, default=None,
                   help="download into this folder instead of the Hugging Face cache")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    print(fetch_checkpoint(args.source, args.local_dir, args.revision))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
