"""Security properties (issue 7). Already tested elsewhere and not repeated: the API key on
every generation route, both header forms, missing and wrong keys (test_gateway); prompts
kept out of the gateway's log on success unless --log-prompts (test_gateway); the download
refusing pickle-only repositories (test_download).

Here: the key is compared with hmac.compare_digest; only safetensors are ever read (no
pickle anywhere in the code, and a malicious pickle beside a config is refused, not run);
tokenizers are loaded from local files without remote code; no command-line tool hands a
string to a shell, and shell metacharacters in a prompt or a path are inert; a refused
request's prompt stays out of the log too.
"""

from __future__ import annotations

import ast
import json
import logging
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from helpers import gateway
from mixtral_triton.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# Every Python file that ships: the library, the Triton models, the commands.
SHIPPED = sorted(p for folder in ("src", "model_repository", "build", "scripts", "client", "deploy")
                 for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
SHELL_SCRIPTS = sorted([*(ROOT / "scripts").glob("*.sh"), *(ROOT / "deploy").rglob("*.sh"), ROOT / ".ci" / "run"])


def _calls(path: Path):
    """(dotted name of the callee, keyword arguments) of every call in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), {k.arg: k.value for k in node.keywords if k.arg}, node.lineno


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_files_scanned_are_the_shipped_ones():
    names = {p.relative_to(ROOT).as_posix() for p in SHIPPED}
    assert {"src/mixtral_triton/ensemble_models/preprocess.py", "model_repository/preprocessing/1/model.py",
            "build/convert_checkpoint.py", "scripts/launch_triton.py", "client/gateway.py"} <= names
    assert len(SHIPPED) > 60


# ---------------------------------------------------------------------------------------
# The API key


def test_the_api_key_is_compared_with_compare_digest(triton_server, monkeypatch):
    """The comparison that decides is hmac.compare_digest's (constant time), on digests of
    equal length: a spy that flips its answer flips the gateway's."""
    import mixtral_triton.gateway.app as app_module

    seen = []
    real = app_module.hmac.compare_digest
    verdict = {"value": None}

    def spy(a, b):
        seen.append((len(a), len(b)))
        return real(a, b) if verdict["value"] is None else verdict["value"]

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    with gateway(triton_grpc_url=triton_server.grpc_url, api_key="right-key") as g:
        url = f"{g.url}/v1/models"
        assert requests.get(url, headers={"Authorization": "Bearer right-key"}).status_code == 200
        assert requests.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        verdict["value"] = False  # compare_digest says no: the right key is refused
        assert requests.get(url, headers={"Authorization": "Api-Key right-key"}).status_code == 401
        verdict["value"] = True  # compare_digest says yes: any key passes
        assert requests.get(url, headers={"Authorization": "Api-Key anything"}).status_code == 200
    assert len(seen) == 4 and all(a == b == 32 for a, b in seen)  # SHA-256 digests, never the keys
    source = (ROOT / "src/mixtral_triton/gateway/app.py").read_text()
    assert not re.search(r"(api_key|given|expected)\s*[!=]=", source), "a key compared with =="


# ---------------------------------------------------------------------------------------
# Safetensors only, never pickle

_PICKLE_CALLS = re.compile(r"^(torch\.load|pickle\.loads?|cPickle\.loads?|dill\.loads?|joblib\.load|"
                           r"numpy\.load|np\.load|torch\.jit\.load|pd\.read_pickle|pandas\.read_pickle)$")


def test_no_shipped_code_can_load_a_pickle():
    offenders = []
    for path in SHIPPED:
        if _imports(path) & {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal"}:
            offenders.append(f"{path.relative_to(ROOT)}: imports a pickle module")
        for callee, keywords, line in _calls(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if _PICKLE_CALLS.match(callee):
                offenders.append(f"{where}: {callee}")
            if callee.endswith("from_pretrained") and "use_safetensors" in keywords \
                    and ast.unparse(keywords["use_safetensors"]) != "True":
                offenders.append(f"{where}: from_pretrained(use_safetensors=...)")
    assert offenders == []


class _Payload:
    """A pickle that, if anything ever loaded it, would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("layout", ["bin-only", "index-naming-bin"])
def test_a_pickle_checkpoint_is_refused_and_never_run(layout, tiny_checkpoint, tmp_path):
    marker = tmp_path / "pickle-was-loaded"
    folder = tmp_path / "hub"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder / "config.json")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_checkpoint / name).exists():
            shutil.copy(tiny_checkpoint / name, folder / name)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    if layout == "index-naming-bin":
        index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
        index["weight_map"] = {name: "pytorch_model.bin" for name in index["weight_map"]}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    from mixtral_triton.convert.mapping import resolve
    from mixtral_triton.convert.writer import convert
    from mixtral_triton.download import check_checkpoint
    from mixtral_triton.pipeline import build_repository

    with pytest.raises(UserError):
        check_checkpoint(folder)
    with pytest.raises(UserError):
        convert(folder, tmp_path / "out", parallel=resolve(tp=1), log=lambda *_: None)
    with pytest.raises(UserError):
        build_repository(folder, tmp_path / "work", tp=1, log=lambda *_: None)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# Tokenizers: local files, no remote code


def test_tokenizers_load_local_files_without_remote_code():
    loads = []
    for path in SHIPPED:
        for callee, keywords, line in _calls(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if "trust_remote_code" in keywords:
                assert ast.unparse(keywords["trust_remote_code"]) == "False", where
            if callee.endswith("from_pretrained") and "Tokenizer" in callee:
                loads.append(where)  # (no trust_remote_code is transformers' default: False)
                assert ast.unparse(keywords.get("local_files_only", ast.Constant(None))) == "True", where
    # the tokenizer model, the token table (written for the detokenizer), the gateway's chat
    # template, the fixture
    assert len(loads) >= 4, loads


# ---------------------------------------------------------------------------------------
# No shell

_SHELL_CALLS = re.compile(r"^(os\.system|os\.popen|os\.spawn\w*|subprocess\.getoutput|"
                          r"subprocess\.getstatusoutput|eval|exec|pty\.spawn)$")


def test_no_shipped_code_hands_a_string_to_a_shell():
    offenders = []
    for path in SHIPPED:
        for callee, keywords, line in _calls(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if _SHELL_CALLS.match(callee):
                offenders.append(f"{where}: {callee}")
            shell = keywords.get("shell")
            if shell is not None and ast.unparse(shell) != "False":
                offenders.append(f"{where}: shell={ast.unparse(shell)}")
    assert offenders == []


def test_shell_scripts_pass_arguments_as_arrays():
    """No eval, no unquoted "$@"/$*, no `sh -c` of a built string; shellcheck finds nothing."""
    for script in SHELL_SCRIPTS:
        text = script.read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"(^|[;&|\s])eval\s", code), script
        assert not re.search(r"(?<!\")\$[@*](?!\")", code.replace('"$@"', "").replace('"$*"', "")), script
        assert not re.search(r"\b(ba)?sh\s+-c\s", code), script
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, "-S", "warning", *map(str, SHELL_SCRIPTS)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout


METACHARACTERS = "$(touch {m}) `touch {m}`; touch {m} && touch {m} | touch {m} > {m} ' \" \\ * ~ !"


def test_shell_metacharacters_are_inert(triton_server, tmp_path):
    marker = tmp_path / "shell-ran"
    nasty = METACHARACTERS.format(m=marker)
    # a prompt, through the gateway and the command-line client (argv, no shell)
    with gateway(triton_grpc_url=triton_server.grpc_url) as g:
        reply = requests.post(f"{g.url}/predict", json={"prompt": nasty, "max_tokens": 2, "stream": False})
        assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] > 20
    done = subprocess.run([sys.executable, str(ROOT / "client" / "predict.py"), nasty, "--max-tokens", "2",
                           "--url", triton_server.grpc_url, "--usage"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # a path, through the launcher's printed GPU command: one quoted word, never run
    repository = tmp_path / f"repo; touch {marker.name} $(touch {marker.name})"
    repository.mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "launch_triton.py"), "--model-repository",
                           str(repository), "--target", "gpu", "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"'--model-repository={repository}'" in done.stdout  # shlex-quoted for copy and paste
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# Prompts stay out of the log when the request is refused, too


def test_a_refused_prompt_is_not_logged(triton_server, caplog):
    secret = "my-secret-prompt-text"
    caplog.set_level(logging.DEBUG)
    with gateway(triton_grpc_url=triton_server.grpc_url) as g:
        for body in ({"prompt": f"{secret} " * 600, "stream": False},  # refused by the server
                     {"prompt": f"{secret} " * 600},  # the same, streamed
                     {"prompt": secret, "top_p": 7},  # refused by the gateway
                     {"prompt": secret, "max_tokens": 10**6}):  # the engine's room
            reply = requests.post(f"{g.url}/predict", json=body)
            assert reply.status_code == 400, reply.text
        assert requests.post(f"{g.url}/predict", data=b'{"prompt": "' + secret.encode() + b'\xff"}').status_code == 400
    assert secret not in caplog.text
