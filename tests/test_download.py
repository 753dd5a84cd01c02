"""Checkpoint download and checks, on local folders only: the hub calls are replaced by fakes
that serve the tiny fixture, so nothing reaches a network."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import OfflineModeIsEnabled

from mixtral_triton.download import (ALLOW_PATTERNS, TOKENIZER_FILES, check_checkpoint, fetch_checkpoint,
                                     main)
from mixtral_triton.errors import UserError
from mixtral_triton.progress import Progress


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A folder of links to the tiny checkpoint's files: each test may replace some of them."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in tiny_checkpoint.iterdir():
        (folder / f.name).symlink_to(f)
    return folder


def _shards(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_a_whole_local_checkpoint_is_accepted_as_it_is(checkpoint, capsys):
    assert len(_shards(checkpoint)) > 1
    assert fetch_checkpoint(str(checkpoint)) == checkpoint
    assert main([str(checkpoint)]) == 0
    assert capsys.readouterr().out.strip() == str(checkpoint)


def test_a_missing_shard_is_reported(checkpoint):
    last = _shards(checkpoint)[-1]
    (checkpoint / last).unlink()
    with pytest.raises(UserError, match=rf"1 of the \d+ shards .* missing \({last}\); run the download again"):
        check_checkpoint(checkpoint)


def test_a_truncated_shard_is_reported(checkpoint):
    first = _shards(checkpoint)[0]
    data = (checkpoint / first).read_bytes()
    (checkpoint / first).unlink()
    (checkpoint / first).write_bytes(data[:-100])
    with pytest.raises(UserError, match=rf"{first} is truncated"):
        check_checkpoint(checkpoint)


def test_a_shard_without_the_tensors_the_index_places_there_is_reported(checkpoint):
    shards = _shards(checkpoint)
    (checkpoint / shards[0]).unlink()
    (checkpoint / shards[0]).symlink_to(checkpoint / shards[1])
    with pytest.raises(UserError, match=rf"{shards[0]} lacks \d+ tensors"):
        check_checkpoint(checkpoint)


def test_pickle_only_checkpoints_are_refused(tmp_path, tiny_checkpoint):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).symlink_to(tiny_checkpoint / name)
    (folder / "pytorch_model-00001-of-00002.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"only pickle weights .* run code when loaded"):
        check_checkpoint(folder)


def test_pickles_beside_safetensors_are_ignored(checkpoint):
    (checkpoint / "pytorch_model.bin").write_bytes(b"never loaded")
    assert check_checkpoint(checkpoint) == checkpoint


@pytest.mark.parametrize("content, message", [
    (None, r"no readable config.json"),
    ('{"model_type": "llama"}', r"model_type 'llama', not 'mixtral'"),
])
def test_a_mixtral_config_is_required(checkpoint, content, message):
    (checkpoint / "config.json").unlink()
    if content is not None:
        (checkpoint / "config.json").write_text(content)
    with pytest.raises(UserError, match=message):
        check_checkpoint(checkpoint)


def test_a_tokenizer_is_required(checkpoint):
    for name in TOKENIZER_FILES:
        (checkpoint / name).unlink()
    with pytest.raises(UserError, match=r"no tokenizer \(tokenizer.json or tokenizer.model\)"):
        check_checkpoint(checkpoint)


def test_a_download_fetches_only_safetensors_configs_and_tokenizer(monkeypatch, tiny_checkpoint, tmp_path):
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_checkpoint)

    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo_id, revision=None: ["config.json", "model-00001-of-00001.safetensors"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert fetch_checkpoint("org/model", tmp_path / "dest", "v1") == tiny_checkpoint
    # Progress with time left: plain lines where the output is not a terminal.
    assert calls == [("org/model", {"revision": "v1", "local_dir": tmp_path / "dest",
                                    "allow_patterns": ALLOW_PATTERNS, "tqdm_class": Progress})]
    assert ALLOW_PATTERNS == ["model*.safetensors", "*.json", "tokenizer.model"]


def test_a_pickle_only_repository_is_refused_before_downloading(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo_id, revision=None: ["config.json", "pytorch_model.bin"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(UserError, match=r"org/model has only pickle weights \(pytorch_model.bin"):
        fetch_checkpoint("org/model")


def test_hub_errors_become_one_line(monkeypatch, capsys):
    def offline(repo_id, revision=None):
        raise OfflineModeIsEnabled("Cannot reach the Hub: offline mode is enabled.\nmore detail")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    assert main(["org/model"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bad_arguments_are_one_line(capsys, checkpoint):
    for argv in (["./no/such/folder"], [str(checkpoint), "--local-dir", "x"], ["--bogus"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err
