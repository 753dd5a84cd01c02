"""The local stack (mixtral_triton.local_stack) when its gateway cannot start: the error
names the gateway's log, and nothing is left running. Its ordinary use is every test on
the session's server (conftest.py), the soak's and scripts/serve.sh's."""

from __future__ import annotations

import pytest

from mixtral_triton.launcher import free_ports
from mixtral_triton.local_stack import GatewayDidNotStart, GatewayOptions, GatewayProcess, LocalStack


def test_a_gateway_that_exits_is_an_error_naming_its_log(tmp_path):
    log = tmp_path / "gateway.log"
    gateway = GatewayProcess("127.0.0.1:1", log, max_concurrency=0)  # refused before it connects
    with pytest.raises(GatewayDidNotStart, match=f"the gateway exited with code 2; see {log}"):
        gateway.start()
    assert "--max-concurrency must be at least 1, got 0" in log.read_text()


def test_a_stack_whose_gateway_fails_stops_its_triton(tmp_path):
    ports = free_ports()
    # TP 1 and one batch slot: the smallest stack that starts
    stack = LocalStack(tmp_path, tp=1, max_batch_size=1, ports=ports, gateway=GatewayOptions(max_concurrency=0),
                       log=lambda *_: None)
    with pytest.raises(GatewayDidNotStart):
        stack.start()
    assert stack.triton is None and stack.gateway is None
    ports.check_free()  # Triton's three ports are free again: it is gone
    assert "Started GRPCInferenceService" in (tmp_path / "triton.log").read_text()
