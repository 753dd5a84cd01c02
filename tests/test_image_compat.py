"""The image-compatibility run: our serving code on the GPU image's own package versions.

The NGC 26.07 TensorRT-LLM image runs our tokenizer, the fill of the detokenizer's token
tables, and the gateway on its packages
(transformers 4.57.1, tokenizers 0.22, fastapi 0.121.3, tritonclient 2.71 ... on Python 3.12:
deploy/image/requirements-compat.txt says where each pin comes from), never on ours.
scripts/tools-venv.sh image-compat makes .venv-image-compat with exactly those; this module,
run by the main suite, checks in it:
 - the product's token ids (the tokenizer model's preprocessing), decoded text (the
   token table the fill writes for the C++ detokenizer, decoded as it decodes) and chat
   prompts are the same as on our versions, for prompts where
   tokenizer versions could differ (spaces, Unicode, byte fallback, control-token text);
 - the gateway, started from that venv in front of the real CPU server, answers /predict,
   /v1/completions and /v1/chat/completions with the same text as a gateway on our versions;
 - the suite's tokenizer/detokenizer and protocol tests pass there
   (test_text.py, test_protocol.py; they need no torch, which the image has but
   this venv does not: the fixture checkpoints are written here and handed over by path).
The Triton server and its Python models stay on the main venv: the CPU server's reference
engine needs torch, and the image runs the C++ engine instead.

Run as a script (`python tests/test_image_compat.py BASE INSTRUCT`) it prints the product's
ids and texts as JSON: how the compat venv answers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["What is mistral wind?", "  two leading spaces", "tabs\tand\nnew lines\n\n",
           "Café crème, 日本語, and 🙂: tell me a story", "[INST] control text [/INST]", "</s><s> specials",
           "x" * 40, "  ", "1234567890 + 0.5 = ?", "naïve façade — “quoted” ‘text’"]


def product_answers(base: Path, instruct: Path) -> dict:
    """Ids, texts and chat prompts as the product computes them, in whichever venv runs this."""
    import numpy as np
    import tokenizers
    import transformers

    from mixtral_triton.gateway.chat import ChatTemplate
    from mixtral_triton.ensemble_models.preprocess import Preprocessor
    from mixtral_triton.text import Detokenizer, load_token_table

    out = {"versions": {"python": f"{sys.version_info.major}.{sys.version_info.minor}",
                        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}}
    for name, folder in (("base", base), ("instruct", instruct)):
        preprocessor = Preprocessor(folder, max_input_len=1024, max_seq_len=2048)
        table = load_token_table(folder)
        ids, texts = [], []
        for prompt in PROMPTS:
            prepared = preprocessor.prepare({"text_input": np.array([[prompt.encode()]], dtype=object),
                                             "max_tokens": np.array([[8]], np.int32)})
            prompt_ids = prepared["input_ids"].reshape(-1).tolist()
            ids.append(prompt_ids)
            detokenizer = Detokenizer(table)  # streamed one id at a time, as the engine sends them
            texts.append("".join(detokenizer.push([i]) for i in prompt_ids[1:]) + detokenizer.finish())
        out[name] = {"ids": ids, "texts": texts}
    out["chat"] = ChatTemplate(instruct).render([{"role": "user", "content": PROMPTS[3]}])
    return out


if __name__ == "__main__":
    print(json.dumps(product_answers(Path(sys.argv[1]), Path(sys.argv[2]))))
    raise SystemExit(0)

import pytest  # noqa: E402  (the script above needs none of the test machinery)
import requests  # noqa: E402

from helpers import gateway, tool_venv  # noqa: E402


@pytest.fixture(scope="module")
def compat_python() -> Path:
    return tool_venv("image-compat") / "bin" / "python"


def compat_run(compat_python: Path, *arguments: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(compat_python), *arguments], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "HF_HUB_OFFLINE": "1", **kwargs.pop("env", {})}, **kwargs)


def test_the_compat_venv_has_the_image_versions(compat_python):
    pins = dict(line.split("==") for line in (ROOT / "deploy/image/requirements-compat.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    names = ("fastapi", "tritonclient", "numpy", "protobuf", "transformers", "tokenizers", "sentencepiece")
    probe = f"import sys; from importlib.metadata import version; print(sys.version_info[:2], *map(version, {names}))"
    run = compat_run(compat_python, "-c", probe)
    assert run.returncode == 0, run.stderr
    python = run.stdout.split(")")[0] + ")"
    assert run.stdout.split(")")[1].split() == [pins[name] for name in names]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if shutil.which("python3.12") or any(pyenv.glob("3.12*")):  # the image's Python, where there is one
        assert python == "(3, 12)", python


def test_ids_and_text_are_the_same_on_the_image_versions(compat_python, tiny_checkpoint,
                                                         tiny_instruct_checkpoint):
    ours = product_answers(tiny_checkpoint, tiny_instruct_checkpoint)
    run = compat_run(compat_python, str(Path(__file__)), str(tiny_checkpoint), str(tiny_instruct_checkpoint))
    assert run.returncode == 0, run.stderr[-4000:]
    theirs = json.loads(run.stdout)
    assert theirs["versions"]["transformers"] == "4.57.1" != ours["versions"]["transformers"]
    for name in ("base", "instruct"):
        for prompt, our_ids, their_ids in zip(PROMPTS, ours[name]["ids"], theirs[name]["ids"]):
            assert their_ids == our_ids, (name, prompt)
        for prompt, our_text, their_text in zip(PROMPTS, ours[name]["texts"], theirs[name]["texts"]):
            assert their_text == our_text, (name, prompt)
    assert theirs["chat"] == ours["chat"]
    # The decoded text is the prompt itself, after the SentencePiece prefix space.
    assert ours["base"]["texts"][3] == " " + PROMPTS[3]


def test_the_suites_text_and_protocol_tests_pass_on_the_image_versions(compat_python, tiny_checkpoint,
                                                                       tiny_instruct_checkpoint):
    run = compat_run(compat_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
                     "-p", "test_image_compat_fixtures", "tests/test_text.py", "tests/test_protocol.py",
                     timeout=900,
                     env={"PYTHONPATH": str(ROOT / "tests"), "MIXTRAL_TRITON_TINY": str(tiny_checkpoint),
                          "MIXTRAL_TRITON_TINY_INSTRUCT": str(tiny_instruct_checkpoint)})
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]


@pytest.fixture(scope="module")
def compat_gateway(compat_python, triton_server, tiny_instruct_checkpoint, tmp_path_factory):
    """client/gateway.py's code run by the compat venv, in front of the real server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("compat") / "gateway.log"
    with open(log, "wb") as out:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        process = subprocess.Popen([str(compat_python), "-m", "mixtral_triton.gateway.cli", "--triton-grpc-url",
                                    triton_server.grpc_url, "--port", str(port), "--tokenizer-dir",
                                    str(tiny_instruct_checkpoint), "--timeout", "30"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**env, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(30)


REQUESTS = [
    ("/predict", {"prompt": PROMPTS[3], "stream": False, "max_tokens": 16, "temperature": 0}),
    ("/predict", {"prompt": PROMPTS[0], "stream": True, "max_tokens": 16, "temperature": 0}),
    ("/v1/completions", {"model": "mixtral", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0,
                         "stream": True}),
    ("/v1/chat/completions", {"model": "mixtral", "messages": [{"role": "user", "content": PROMPTS[3]}],
                              "max_tokens": 12, "temperature": 0}),
    ("/v1/completions", {"model": "mixtral", "prompt": PROMPTS[0], "max_tokens": 0}),  # a refusal
]


def _answer(url: str, path: str, body: dict) -> tuple[int, str]:
    reply = requests.post(f"{url}{path}", json=body, timeout=60)
    text = reply.text
    if body.get("stream") and path.startswith("/v1"):  # ids and timestamps differ: keep the text
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    elif reply.headers.get("content-type", "").startswith("application/json"):
        doc = reply.json()
        for key in ("id", "created"):
            doc.pop(key, None)
        text = json.dumps(doc, sort_keys=True)
    return reply.status_code, text


def test_the_gateway_answers_the_same_on_the_image_versions(compat_gateway, triton_server,
                                                            tiny_instruct_checkpoint):
    with gateway(triton_grpc_url=triton_server.grpc_url, tokenizer_dir=tiny_instruct_checkpoint) as ours:
        for path, body in REQUESTS:
            expected = _answer(ours.url, path, body)
            assert expected[0] in (200, 400), expected
            assert _answer(compat_gateway, path, body) == expected, (path, body)
