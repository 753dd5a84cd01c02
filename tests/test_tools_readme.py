"""The README's load-testing commands, read from the README and run as written against the
real CPU server: only the addresses (`scripts/serve.sh`'s default ports), the tokenizer
folder it writes and genai-perf's and aiperf's report folders are replaced by this test's
own."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import active_requests, short_tmpdir

ROOT = Path(__file__).resolve().parents[1]


def load_testing_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Load testing\n(.*?)^## ", readme, re.DOTALL | re.MULTILINE)
    assert section, "README.md has no '## Load testing' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.DOTALL | re.MULTILINE)
    assert len(blocks) == 4, blocks
    return blocks


@pytest.mark.parametrize("index", range(4), ids=["perf_analyzer", "genai-perf-tensorrtllm",
                                                 "genai-perf-completions", "aiperf-completions"])
def test_readme_load_testing_command_runs(index, triton_server, base_gateway, tiny_checkpoint, tmp_path):
    command = load_testing_commands()[index]
    for written, ours in (("localhost:8001", triton_server.grpc_url),
                          ("localhost:8080", base_gateway.url.removeprefix("http://")),
                          (".cache/serve/hub/tiny", str(tiny_checkpoint)),
                          (".cache/genai-perf/", f"{tmp_path}/"),
                          (".cache/aiperf/", f"{tmp_path}/")):
        command = command.replace(written, ours)
    with short_tmpdir() as tmp:  # aiperf's sockets (helpers.short_tmpdir)
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=ROOT, capture_output=True,
                             text=True, timeout=1200, env={**os.environ, "TMPDIR": str(tmp)})
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    if index == 0:  # perf_analyzer
        assert "Detected decoupled model" in output, output
        assert re.search(r"Concurrency: 2, throughput: [\d.]+ infer/sec", output), output
    elif index in (1, 2):  # genai-perf
        summary = json.loads(next(tmp_path.rglob("profile_export_genai_perf.json")).read_text())
        assert summary["request_count"]["avg"] == 8, summary
        assert summary["output_sequence_length"]["min"] > 0, summary
    else:  # aiperf: every request answered; by our own counts, 64 tokens in (BOS in) and 32 out
        summary = json.loads(next(tmp_path.rglob("profile_export_aiperf.json")).read_text())
        assert summary["request_count"]["avg"] == 8 and summary["request_error_rate"]["avg"] == 0, summary
        for name, tokens in (("usage_prompt_tokens", 64), ("usage_completion_tokens", 32)):
            assert summary[name]["min"] == summary[name]["max"] == tokens, summary[name]
        assert summary["output_sequence_length"]["min"] > 0, summary
    if index == 1:  # perf_analyzer read every declared output of every response, none absent
        export = json.loads(next(tmp_path.rglob("profile_export.json")).read_text())
        outputs = [o for r in export["experiments"][0]["requests"] for o in r["response_outputs"]]
        assert outputs and all(o["num_input_tokens"] == o["prompt_tokens"] and o["sequence_index"] == 0
                               and o["cum_log_probs"] == o["output_log_probs"] == 0 for o in outputs), outputs
    assert active_requests(triton_server) == 0
