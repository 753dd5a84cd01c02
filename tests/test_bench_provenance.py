"""Where benchmark figures come from: the tree a run measured (clean or dirty, outputs aside)
and the anchor's repository rebuilt from a given tensorrtllm_backend copy (real git, real
files in a temporary folder)."""

import subprocess
from pathlib import Path

import pytest

from mixtral_triton.bench import machine
from mixtral_triton.bench.anchor import ANCHOR_MODELS, ANCHOR_TAG, FILES, build_anchor_repository, fill
from mixtral_triton.errors import UserError

OUTPUTS = ("BENCHMARKS.md", "bench/results")


def git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path) -> Path:
    folder = tmp_path / "repo"
    (folder / "bench" / "results").mkdir(parents=True)
    (folder / "code.py").write_text("x = 1\n")
    (folder / "BENCHMARKS.md").write_text("old\n")
    (folder / "bench" / "results" / "latest.json").write_text("{}\n")
    (folder / ".gitignore").write_text("work/\n")
    git(folder, "init", "-q")
    git(folder, "add", "-A")
    git(folder, "commit", "-qm", "start")
    return folder


def test_a_clean_tree_has_no_dirty_paths(repo):
    assert machine.dirty_paths(repo, OUTPUTS) == []
    assert machine.describe(repo, OUTPUTS)["git_dirty"] is False


def test_changed_and_new_files_make_the_tree_dirty_but_the_outputs_and_ignored_files_do_not(repo):
    (repo / "BENCHMARKS.md").write_text("new\n")
    (repo / "bench" / "results" / "latest.json").write_text('{"new": 1}\n')
    (repo / "work").mkdir()
    (repo / "work" / "scratch").write_text("ignored\n")
    assert machine.dirty_paths(repo, OUTPUTS) == []
    (repo / "code.py").write_text("x = 2\n")
    (repo / "new_module.py").write_text("y = 1\n")
    assert sorted(machine.dirty_paths(repo, OUTPUTS)) == ["code.py", "new_module.py"]
    described = machine.describe(repo, OUTPUTS)
    assert described["git_dirty"] is True and len(described["git_commit"]) == 40


def test_no_git_no_answer(tmp_path):
    assert machine.dirty_paths(tmp_path, OUTPUTS) is None


def anchor_files() -> dict[str, str]:
    """The anchor's files as far as the rebuild cares: templates with ${...} and the two
    engine input names that TensorRT-LLM 1.2.1 spells differently."""
    config = 'name: "{}"\nmax_batch_size: ${{triton_max_batch_size}}\nparameters {{ key: "tokenizer_dir" ' \
             'value: {{ string_value: "${{tokenizer_dir}}" }} }}\n'
    files = {name: "# model\n" for name in FILES if name.endswith("model.py")}
    files["preprocessing/config.pbtxt"] = config.format("preprocessing") + \
        "instance_group [ { count: ${preprocessing_instance_count} } ]\n"
    files["postprocessing/config.pbtxt"] = config.format("postprocessing") + \
        "instance_group [ { count: ${postprocessing_instance_count} } ]\n"
    files["ensemble/config.pbtxt"] = 'name: "ensemble"\nmax_batch_size: ${triton_max_batch_size}\n' \
        'step { model_name: "tensorrt_llm" input_map { key: "min_length" value: "min_length" } ' \
        'input_map { key: "random_seed" value: "random_seed" } }\n'
    return files


def write_anchor(folder: Path) -> Path:
    for name, text in anchor_files().items():
        path = folder / ANCHOR_MODELS / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


@pytest.fixture
def standin_repository(tmp_path) -> Path:
    engine = tmp_path / "standin" / "tensorrt_llm"
    (engine / "1").mkdir(parents=True)
    (engine / "config.pbtxt").write_text('name: "tensorrt_llm"\n')
    (engine / "1" / "model.py").write_text("# the stand-in\n")
    return tmp_path / "standin"


def check_built(out: Path) -> None:
    ensemble = (out / "ensemble" / "config.pbtxt").read_text()
    assert 'key: "min_tokens" value: "min_length"' in ensemble and 'key: "seed" value: "random_seed"' in ensemble
    assert "max_batch_size: 64" in ensemble and "${" not in ensemble
    post = (out / "postprocessing" / "config.pbtxt").read_text()
    assert "count: 1 " in post and 'string_value: "/tok"' in post
    assert (out / "ensemble" / "1").is_dir()
    assert (out / "tensorrt_llm" / "1" / "model.py").read_text() == "# the stand-in\n"


def test_the_anchor_is_rebuilt_from_a_git_directory_at_its_tag(tmp_path, standin_repository):
    anchor = write_anchor(tmp_path / "backend")
    git(anchor, "init", "-q")
    git(anchor, "add", "-A")
    git(anchor, "commit", "-qm", "anchor")
    git(anchor, "tag", ANCHOR_TAG)
    # a later commit the rebuild must not read
    (anchor / ANCHOR_MODELS / "ensemble" / "config.pbtxt").write_text("broken ${nothing}\n")
    git(anchor, "commit", "-qam", "later")
    out, source = build_anchor_repository(anchor, standin_repository, Path("/tok"), tmp_path / "out", 64)
    check_built(out)
    assert source["tag"] == ANCHOR_TAG and len(source["commit"]) == 40


def test_the_anchor_is_rebuilt_from_a_plain_checkout(tmp_path, standin_repository):
    anchor = write_anchor(tmp_path / "backend")
    out, source = build_anchor_repository(anchor, standin_repository, Path("/tok"), tmp_path / "out", 64)
    check_built(out)
    assert source["commit"] is None


def test_a_folder_that_is_not_tensorrtllm_backend_is_refused_naming_it(tmp_path, standin_repository):
    with pytest.raises(UserError, match="--anchor .*nowhere.* neither a git directory holding tag"):
        build_anchor_repository(tmp_path / "nowhere", standin_repository, Path("/tok"), tmp_path / "out", 64)


def test_a_template_value_left_unfilled_is_an_error_naming_it():
    with pytest.raises(UserError, match=r"\$\{max_queue_size\}"):
        fill("default_queue_policy: { max_queue_size: ${max_queue_size} }", {})
    assert fill("a ${x} b ${x}", {"x": "1"}) == "a 1 b 1"
