"""The one local stack of a benchmark section (mixtral_triton.local_stack: Triton and the
gateway in front of it), restarted (and the crash or hang recorded in the results) when the
server dies or stops answering during a cell, so that one bad cell does not lose the run."""

from __future__ import annotations

from mixtral_triton.bench.process_stats import group_states
from mixtral_triton.bench.request_clients import REQUEST_TIMEOUT_S, Record
from mixtral_triton.errors import UserError
from mixtral_triton.local_stack import GatewayDidNotStart, LocalStack


# A server that dies while its many stubs start (seen on this machine under load: a stub
# killed holding a shared-memory lock aborts tritonserver) is started again, this many times
# in all, each failed start recorded in the section.
STARTS = 3


class SupervisedStack:
    def __init__(self, local: LocalStack, section: dict, log):
        self.local, self.section, self.log = local, section, log

    @property
    def server(self):
        return self.local.triton

    @property
    def gateway(self):
        return self.local.gateway

    def start(self) -> None:
        for attempt in range(1, STARTS + 1):
            try:
                return self._start()
            except UserError as exc:
                if isinstance(exc, GatewayDidNotStart) or attempt == STARTS:
                    raise
                self.section.setdefault("server_crashes", []).append(
                    {"during": "start", "kind": "exit", "errors": str(exc)[-1500:]})
                self.log(f"  !! tritonserver did not start (attempt {attempt} of {STARTS}); starting it again")

    def _start(self) -> None:
        try:
            self.local.start()
        except GatewayDidNotStart as exc:  # the section goes on without the gateway's path
            self.local.gateway_options = None
            self.section.setdefault("missing", {})["gateway_predict"] = str(exc)
            self.log(f"  gateway: MISSING ({exc})")
            self.local.start()

    def stop(self) -> None:
        self.local.stop()

    def __enter__(self) -> "SupervisedStack":
        if self.server is None:  # not started yet
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def check(self, cell: str, records: "list[Record] | None" = None, hung: bool = False) -> bool:
        """True if the server is alive and answered every one of `records`; else record the
        crash (or hang) and restart everything."""
        hung = hung or any(r.error and r.error.startswith("no end within") for r in records or ())
        if self.server.process.poll() is None and not hung:
            return True
        dead = [line for line in group_states(self.pgid) if " Z " in line]
        errors = self.server.log_errors() or self.server.log_tail()
        self.section.setdefault("server_crashes", []).append({
            "during": cell, "kind": "hang" if self.server.process.poll() is None else "exit",
            "exit_code": self.server.process.poll(), "defunct_processes": dead,
            "log": str(self.server.log_file), "errors": errors[-1500:]})
        what = "hung (a request got no response for %.0f s)" % REQUEST_TIMEOUT_S if hung else \
            f"died (exit {self.server.process.returncode})"
        self.log(f"  !! tritonserver {what} during {cell}{'; defunct: ' + '; '.join(dead) if dead else ''}; "
                 "restarting")
        self.stop()
        self.start()
        return False

    @property
    def pgid(self) -> int:
        return self.server.process.pid

    @property
    def gateway_pid(self) -> int | None:
        return self.gateway.pid if self.gateway is not None else None

    @property
    def gateway_url(self) -> str | None:
        return self.gateway.url if self.gateway is not None else None
