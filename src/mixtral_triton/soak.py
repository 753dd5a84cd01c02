"""Soak: many mixed requests through the gateway and gRPC, counting failures and watching
the resident memory of every serving process (scripts/soak.py; tests/test_soak.py runs a
small one).

The requests are a fixed-seed mixture: gateway /predict (streamed and not),
/v1/completions (SSE and JSON), /v1/chat/completions when the gateway has a chat template,
and the ensemble over gRPC through our client; prompts from a few characters to a few
hundred tokens, every sampling setting, stop strings, max_tokens from 1 to 200; some
streams abandoned after their first piece (the gateway and the client then cancel them),
and a few requests that must be refused (400 / RequestError), counted apart. Everything
else that is not a whole, well-formed answer is an unexpected failure.

Resident memory (VmRSS from /proc) of tritonserver, each of its triton_python_backend_stub
children (one per model instance) and the gateway is sampled before the first request,
after the warm-up requests and at the end. The run is bounded in requests and in time;
all traffic goes to the addresses it is given (loopback by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import signal
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mixtral_triton.errors import OneLineArgumentParser, UserError, one_line_errors
from mixtral_triton.launcher.stubs import stub_processes

ROOT = Path(__file__).resolve().parents[2]
INTERFACES = ("grpc", "predict", "completions", "chat")
_WORDS = ("wind", "mistral", "valley", "Rhône", "cold", "north", "sea", "storm", "café", "東京",
          "🌬️", "forecast", "gust", "naïve", "déjà", "vu", "\n", "  ", "tabs\there", "über")


# ---------------------------------------------------------------------------------------
# The plan: one Job per request, from a fixed seed


@dataclass(frozen=True)
class Job:
    index: int
    interface: str  # one of INTERFACES
    stream: bool
    cancel: bool  # abandon the stream after its first piece
    invalid: bool  # a request the server must refuse
    fields: dict  # predict fields (prompt included)


def plan(count: int, seed: int = 0, chat: bool = True, cancel_every: int = 10,
         invalid_every: int = 50) -> list[Job]:
    rng = random.Random(seed)
    interfaces = INTERFACES if chat else INTERFACES[:-1]
    jobs = []
    for i in range(count):
        interface = rng.choice(interfaces)
        words = rng.choice((1, 3, 12, 60, 250))
        prompt = " ".join(rng.choice(_WORDS) for _ in range(words)).strip() or "wind"
        fields = {"prompt": prompt, "max_tokens": rng.choice((1, 4, 16, 64, 200))}
        temperature = rng.choice((0, 0.7, 1.0))
        fields["temperature"] = temperature
        if temperature and rng.random() < 0.5:
            fields["top_k"] = rng.choice((0, 1, 40))
            fields["top_p"] = rng.choice((0.5, 0.9, 1.0))
        if rng.random() < 0.3:
            fields["seed"] = rng.randrange(2**64)
        if rng.random() < 0.15:
            fields["stop"] = rng.choice((["\n"], [" the", "."], "é"))
        if rng.random() < 0.1:
            fields.update(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.5)
        stream = rng.random() < 0.6
        invalid = invalid_every > 0 and rng.random() < 1 / invalid_every
        if invalid:
            fields["top_p"] = 2.0
        cancel = stream and not invalid and cancel_every > 0 and rng.random() < 1 / cancel_every
        jobs.append(Job(i, interface, stream, cancel, invalid, fields))
    return jobs


# ---------------------------------------------------------------------------------------
# Running one job


@dataclass
class Outcome:
    job: Job
    kind: str  # "ok", "cancelled", "refused" (as expected) or "failed"
    detail: str = ""
    seconds: float = 0.0


class Runner:
    def __init__(self, grpc_url: str, gateway_url: str, timeout_s: float = 120.0, model: str = "mixtral"):
        import requests

        from mixtral_triton.client import PredictClient

        self.grpc_url = grpc_url
        self.gateway_url = gateway_url.rstrip("/")
        self.timeout_s = timeout_s
        self.model = model
        self.client = PredictClient(grpc_url, timeout_s=timeout_s)
        self.session_local = threading.local()
        self._requests = requests

    def _session(self):
        if not hasattr(self.session_local, "session"):
            self.session_local.session = self._requests.Session()
        return self.session_local.session

    def run(self, job: Job) -> Outcome:
        started = time.monotonic()
        try:
            kind, detail = (self._grpc if job.interface == "grpc" else self._http)(job)
        except Exception as exc:  # anything unforeseen is a failure to report, not a crash
            kind, detail = "failed", f"{type(exc).__name__}: {exc}"
        if job.invalid and kind != "refused":
            kind, detail = "failed", f"an invalid request was not refused ({kind} {detail})"
        return Outcome(job, kind, detail[:300], time.monotonic() - started)

    # gRPC, through our client
    def _grpc(self, job: Job) -> tuple[str, str]:
        from mixtral_triton.client import ServerError
        from mixtral_triton.protocol import RequestError, parse_request

        try:
            request = parse_request({**job.fields, "stream": job.stream})
        except RequestError as exc:
            return ("refused", str(exc)) if job.invalid else ("failed", f"refused: {exc}")
        try:
            chunks = self.client.generate(request)
            if job.cancel:
                first = next(chunks)
                chunks.close()  # the client cancels the generation on the server
                return "cancelled", first.text[:20]
            last = None
            for last in chunks:
                pass
        except ServerError as exc:
            return "failed", f"ServerError {exc.status}: {exc}"
        return _check_last(last.finish_reason, last.completion_tokens, job)

    # HTTP, through the gateway
    def _http(self, job: Job) -> tuple[str, str]:
        fields = dict(job.fields)
        if job.interface == "predict":
            path, body = "/predict", {**fields, "stream": job.stream}
        elif job.interface == "completions":
            path, body = "/v1/completions", {"model": self.model, **fields, "stream": job.stream}
        else:
            prompt = fields.pop("prompt")
            path = "/v1/chat/completions"
            body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], **fields,
                    "stream": job.stream}
        reply = self._session().post(self.gateway_url + path, json=body, stream=job.stream,
                                     timeout=self.timeout_s)
        with reply:
            if reply.status_code == 400 and job.invalid:
                return "refused", reply.json()["error"]["message"]
            if reply.status_code != 200:
                return "failed", f"HTTP {reply.status_code}: {reply.text[:200]}"
            if not job.stream:
                answer = reply.json()
                if job.interface == "predict":
                    return _check_last(answer["finish_reason"], answer["usage"]["completion_tokens"], job)
                return _check_last(answer["choices"][0]["finish_reason"],
                                   answer["usage"]["completion_tokens"], job)
            pieces = reply.iter_content(chunk_size=None, decode_unicode=False)
            if job.cancel:
                next(pieces)
                return "cancelled", ""  # leaving the block closes the connection: a disconnect
            raw = b"".join(pieces)
        text = raw.decode("utf-8")  # strict: no chunk may have split a character
        if job.interface == "predict":
            return "ok", f"{len(text)} characters"
        # SSE lines end at \n (str.splitlines would also split at U+2028 and the like)
        events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
        if not text.rstrip().endswith("data: [DONE]") or not events:
            return "failed", f"the event stream did not end with [DONE]: {text[-120:]!r}"
        if "error" in events[-1]:
            return "failed", f"error event: {events[-1]['error']}"
        last = next(e for e in reversed(events) if e.get("choices"))
        usage = next((e["usage"] for e in reversed(events) if e.get("usage")), None)
        if usage is None:
            return "failed", "no usage in the stream"
        return _check_last(last["choices"][0]["finish_reason"], usage["completion_tokens"], job)


def _check_last(finish_reason, completion_tokens: int, job: Job) -> tuple[str, str]:
    if finish_reason not in ("stop", "length"):
        return "failed", f"finish_reason {finish_reason!r}"
    if not 0 <= completion_tokens <= job.fields["max_tokens"]:
        return "failed", f"{completion_tokens} tokens for max_tokens {job.fields['max_tokens']}"
    if finish_reason == "length" and completion_tokens != job.fields["max_tokens"]:
        return "failed", f"length after {completion_tokens} of {job.fields['max_tokens']} tokens"
    return "ok", f"{finish_reason} after {completion_tokens} tokens"


# ---------------------------------------------------------------------------------------
# Resident memory from /proc


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def serving_processes(triton_pid: int, gateway_pid: int | None = None) -> dict[str, int]:
    """Label -> pid: tritonserver, its Python stubs (labelled by instance), the gateway."""
    processes = {"tritonserver": triton_pid}
    processes.update({f"stub:{name}": pid for name, pid in sorted(stub_processes(triton_pid).items())})
    if gateway_pid is not None:
        processes["gateway"] = gateway_pid
    return processes


def sample_rss(processes: dict[str, int]) -> dict[str, int | None]:
    return {label: rss_kib(pid) for label, pid in processes.items()}


# ---------------------------------------------------------------------------------------
# The soak


@dataclass
class Report:
    requests: int
    concurrency: int
    seconds: float
    counts: dict[str, int]
    by_interface: dict[str, dict[str, int]]
    failures: list[str]
    rss_kib: dict[str, dict[str, int | None]]  # label -> {"start", "warm", "end"}
    engine_active_after: float | None
    gateway_in_flight_after: float | None
    not_run: int = 0  # planned requests not sent because the time limit came first

    @property
    def unexpected(self) -> int:
        return self.counts.get("failed", 0)

    def growth_kib(self, label: str, since: str = "warm") -> int | None:
        values = self.rss_kib[label]
        if values.get(since) is None or values.get("end") is None:
            return None
        return values["end"] - values[since]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "unexpected": self.unexpected}

    @classmethod
    def from_json(cls, data: dict) -> "Report":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def markdown(self) -> str:
        served = self.counts.get("ok", 0) + self.counts.get("cancelled", 0)
        lines = [f"{self.requests} requests at concurrency {self.concurrency} in {self.seconds:.0f} s: "
                 f"{self.counts.get('ok', 0)} whole, {self.counts.get('cancelled', 0)} cancelled "
                 f"mid-stream, {self.counts.get('refused', 0)} refused as they must be, "
                 f"**{self.unexpected} unexpected failures** ({served} served"
                 + (f"; {self.not_run} not sent, time limit" if self.not_run else "") + ").",
                 "", "| interface | whole | cancelled | refused | failed |", "| --- | --- | --- | --- | --- |"]
        for interface, counts in sorted(self.by_interface.items()):
            lines.append(f"| {interface} | {counts.get('ok', 0)} | {counts.get('cancelled', 0)} | "
                         f"{counts.get('refused', 0)} | {counts.get('failed', 0)} |")
        lines += ["", "| process | RSS start (MiB) | after warm-up | end | growth since warm-up |",
                  "| --- | --- | --- | --- | --- |"]
        for label, values in self.rss_kib.items():
            growth = self.growth_kib(label)
            lines.append(f"| {label} | {_mib(values.get('start'))} | {_mib(values.get('warm'))} | "
                         f"{_mib(values.get('end'))} | "
                         f"{'' if growth is None else f'{growth / 1024:+.1f}'} |")
        lines += ["", f"After the run: engine active requests {self.engine_active_after}, "
                      f"gateway generations in flight {self.gateway_in_flight_after}."]
        if self.failures:
            lines += ["", "Failures:"] + [f"- {failure}" for failure in self.failures]
        return "\n".join(lines) + "\n"


def _mib(kib: int | None) -> str:
    return "" if kib is None else f"{kib / 1024:.1f}"


def _gauge(url: str, pattern: str) -> float | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


def engine_active(metrics_url: str) -> float | None:
    return _gauge(metrics_url, r'^nv_trt_llm_request_metrics\{[^}]*request_type="active"[^}]*\} (\S+)$')


def gateway_in_flight(gateway_url: str) -> float | None:
    return _gauge(gateway_url.rstrip("/") + "/metrics", r"^mixtral_gateway_generations_in_flight (\S+)$")


def soak(runner: Runner, jobs: list[Job], processes: dict[str, int], concurrency: int = 8,
         warmup: int = 50, time_limit_s: float = 1800.0, metrics_url: str | None = None,
         log=print) -> Report:
    """Run `jobs` `concurrency` at a time (at most `time_limit_s`); sample RSS at the start,
    after `warmup` requests and at the end."""
    rss = {label: {"start": value} for label, value in sample_rss(processes).items()}
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    warm_sampled = threading.Event()
    deadline = time.monotonic() + time_limit_s
    started = time.monotonic()
    skipped = [0]

    def one(job: Job) -> None:
        if time.monotonic() > deadline:
            with lock:
                skipped[0] += 1
            return
        outcome = runner.run(job)
        with lock:
            outcomes.append(outcome)
            done = len(outcomes)
            if outcome.kind == "failed":
                log(f"request {job.index} ({job.interface}) failed: {outcome.detail}")
            if done % 100 == 0:
                log(f"{done} requests, {sum(o.kind == 'failed' for o in outcomes)} failed, "
                    f"{time.monotonic() - started:.0f} s")
            if done == warmup and not warm_sampled.is_set():
                for label, value in sample_rss(processes).items():
                    rss[label]["warm"] = value
                warm_sampled.set()

    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="soak")
    try:
        list(pool.map(one, jobs))
    finally:  # interrupted: what is queued is dropped, what runs ends within the runner's timeout
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.monotonic() - started
    time.sleep(1.0)  # the last streams' slots and engine requests are let go just after
    for label, value in sample_rss(processes).items():
        rss[label]["end"] = value
    counts: dict[str, int] = {}
    by_interface: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        counts[outcome.kind] = counts.get(outcome.kind, 0) + 1
        per = by_interface.setdefault(outcome.job.interface, {})
        per[outcome.kind] = per.get(outcome.kind, 0) + 1
    failures = [f"#{o.job.index} {o.job.interface} stream={o.job.stream}: {o.detail}"
                for o in outcomes if o.kind == "failed"][:20]
    return Report(len(outcomes), concurrency, seconds, counts, by_interface, failures, rss,
                  engine_active(metrics_url) if metrics_url else None,
                  gateway_in_flight(runner.gateway_url), skipped[0])


# ---------------------------------------------------------------------------------------
# The results file, and the docs' table generated from it


def results_json(report: Report, settings: dict, machine: dict, note: str | None) -> dict:
    """What a soak run writes: its report, how it was run, and on what (commit, dirty flag,
    date, cores, Python, package versions: mixtral_triton.bench.machine)."""
    from mixtral_triton.bench.machine import load_average

    return {"kind": "soak", "settings": settings, "note": note, "machine": machine,
            "load_average_at_end": load_average(), "report": report.to_json()}


def results_markdown(data: dict, source: str) -> str:
    """The docs' soak section from a results file: where and on what it was measured, then
    the report's own tables."""
    machine = data["machine"]
    settings = data["settings"]
    tree = {True: "a dirty tree", False: "a clean tree"}.get(machine.get("git_dirty"), "an unknown tree")
    lines = [f"From `{source}`: `scripts/soak.py --requests {settings['requests']} --concurrency "
             f"{settings['concurrency']} --time-limit {settings['time_limit_s']:g}` (seed {settings['seed']}, "
             f"request timeout {settings['request_timeout_s']:g} s) at commit "
             f"`{(machine.get('git_commit') or 'unknown')[:12]}` on {tree}, {machine['date_utc']}; "
             f"{machine['cores']} cores, Python {machine['python']}, nvidia-pytriton "
             f"{machine['packages'].get('nvidia-pytriton')}, torch {machine['packages'].get('torch')}; "
             f"load average (1, 5, 15 min) {_loads(machine.get('load_average_at_start'))} at the start, "
             f"{_loads(data.get('load_average_at_end'))} at the end."]
    if data.get("note"):
        lines[0] += f" {data['note']}"
    return "\n".join(lines) + "\n\n" + Report.from_json(data["report"]).markdown()


def _loads(values: list[float] | None) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "unknown"


DOC = ROOT / "docs" / "reliability.md"
DOC_BEGIN = "<!-- soak results: generated by `scripts/soak.py --write-doc FILE`; do not edit by hand -->"
DOC_END = "<!-- end of soak results -->"


def doc_with_results(doc: str, section: str) -> str:
    """`doc` with the text between DOC_BEGIN and DOC_END replaced by `section`."""
    try:
        head, rest = doc.split(DOC_BEGIN + "\n", 1)
        _, tail = rest.split(DOC_END, 1)
    except ValueError:
        raise UserError(f"{DOC} lacks the markers of the generated soak section") from None
    return f"{head}{DOC_BEGIN}\n{section}{DOC_END}{tail}"


# ---------------------------------------------------------------------------------------
# scripts/soak.py: the tiny model served here, soaked

MAX_CONCURRENCY = 1024


def request_timeout_s(concurrency: int) -> float:
    """A request waits for the ones ahead of it: on a shared 2-core machine the engine (8
    batch slots) ends about 3 of the soak's requests a second (bench/results/soak.json), so
    at concurrency C the last one queued waits about C / 3 s before its first token. 1.5 s
    per request in flight leaves room for a busier machine; never under 120 s."""
    return max(120.0, 1.5 * concurrency)


def parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="soak.py", description="Soak the CPU serving stack (tiny model): "
                              "Triton and the gateway on loopback, mixed requests, failures and "
                              "resident memory reported, and a results file written.")
    p.add_argument("--requests", type=int, default=1000, help="requests to send (default 1000)")
    p.add_argument("--concurrency", type=int, default=8,
                   help=f"requests in flight, 1 to {MAX_CONCURRENCY} (default 8)")
    p.add_argument("--warmup", type=int, default=100,
                   help="requests after which the 'warm' memory is sampled (default 100)")
    p.add_argument("--seed", type=int, default=0, help="the mixture's seed (default 0)")
    p.add_argument("--time-limit", type=float, default=1800.0,
                   help="seconds after which no new request is sent (default 1800)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds one request may take (default max(120, 1.5 x concurrency): it "
                        "queues behind the others)")
    p.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "soak",
                   help="where the fixture, converted checkpoint, repository and logs go")
    p.add_argument("--json", type=Path, default=None,
                   help="the results file (default <work-dir>/soak.json); bench/results/soak.json "
                        "is the one docs/reliability.md shows")
    p.add_argument("--note", default=None, help="a remark kept in the results file (e.g. the machine was shared)")
    p.add_argument("--write-doc", type=Path, default=None, metavar="RESULTS",
                   help="run nothing: rewrite docs/reliability.md's soak results from this results file")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.write_doc is not None:
        return write_doc(args.write_doc)
    if args.requests < 1 or not 0 <= args.warmup < args.requests:
        raise UserError("--requests must be at least 1, and --warmup from 0 to below --requests")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        raise UserError(f"--concurrency must be between 1 and {MAX_CONCURRENCY}, got {args.concurrency}")
    if args.time_limit <= 0:
        raise UserError(f"--time-limit must be positive, got {args.time_limit}")
    timeout_s = args.request_timeout if args.request_timeout is not None else request_timeout_s(args.concurrency)
    if timeout_s <= 0:
        raise UserError(f"--request-timeout must be positive, got {timeout_s}")
    from mixtral_triton.bench.machine import describe
    from mixtral_triton.local_stack import GatewayOptions, LocalStack

    machine = describe(ROOT)  # before the run: the commit and tree it ran on
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so Triton and the gateway are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results_file = args.json or args.work_dir / "soak.json"
    # The gateway's bound stays above the soak's own (a cancelled stream's slot is given back
    # just after it goes), and its timeout is the soak's.
    gateway = GatewayOptions(max_concurrency=max(64, 2 * args.concurrency), timeout_s=timeout_s,
                             log_level="warning")
    # The engine batches every request in flight: a smaller batch would queue the rest in
    # the engine for longer than the clients' timeouts at high concurrency.
    with LocalStack(args.work_dir, tokenizer="instruct", gateway=gateway,
                    max_batch_size=max(8, args.concurrency),
                    log=lambda line: print(line, flush=True)) as stack:
        processes = serving_processes(stack.triton.process.pid, stack.gateway.pid)
        print(f"soaking: {args.requests} requests, concurrency {args.concurrency}; processes "
              f"{', '.join(f'{k}={v}' for k, v in processes.items())}", flush=True)
        runner = Runner(stack.triton.grpc_url, stack.gateway.url, timeout_s=timeout_s)
        report = soak(runner, plan(args.requests, args.seed), processes, args.concurrency,
                      args.warmup, args.time_limit, stack.metrics_url, log=lambda line: print(line, flush=True))
    print(report.markdown(), flush=True)
    settings = {"requests": args.requests, "concurrency": args.concurrency, "warmup": args.warmup,
                "seed": args.seed, "time_limit_s": args.time_limit, "request_timeout_s": timeout_s}
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results_json(report, settings, machine, args.note), indent=2) + "\n")
    print(f"results: {results_file}", flush=True)
    return 1 if report.unexpected else 0


def write_doc(results_file: Path) -> int:
    data = json.loads(results_file.read_text())
    try:
        source = str(results_file.resolve().relative_to(ROOT))
    except ValueError:
        source = str(results_file)
    DOC.write_text(doc_with_results(DOC.read_text(), results_markdown(data, source)))
    print(f"{DOC.relative_to(ROOT)}: soak results from {source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
