"""The CPU reference engine behind the tensorrt_llm model's tensor contract.

Requests go to mixtral_triton.reference.Engine (in-flight batching on a background
thread), stepping the reference model or, for load tests (parameter `engine`: "standin"),
the paced table stand-in of mixtral_triton.standin; its events come back as
streamed responses. Like the C++ backend, the instance
checks for cancelled requests periodically, and a request with `stop = true` cancels the
running request of the same request id.
"""

import json
import threading

import torch
import triton_python_backend_utils as pb_utils

from mixtral_triton.errors import UserError
from mixtral_triton.protocol.errors import INTERNAL, INVALID_ARGUMENT, coded
from mixtral_triton.reference import Engine, ReferenceModel
from mixtral_triton.reference.engine import QueueFull
from mixtral_triton.reference.contract import is_stop_request, output_arrays, request_from_inputs
from mixtral_triton.standin import Pacing, TableModel

CANCELLATION_CHECK_PERIOD_S = 0.05
# The C++ backend's request gauge, same name and labels, so dashboards, autoscaling and
# tests read one metric on either engine.
REQUEST_METRICS = "nv_trt_llm_request_metrics"


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(1)  # more threads than cores left stalls every step many-fold
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        if params["engine"] == "standin":
            model = TableModel.from_folders(params["tokenizer_dir"], params["checkpoint_dir"], Pacing(
                params["standin_gpu"], int(params["standin_tp"]), float(params["standin_pace_scale"])))
        else:
            model = ReferenceModel.from_trtllm_checkpoint(params["checkpoint_dir"])
        # The queue bound of this model's dynamic_batching, which the C++ backend also
        # applies to its executor: more requests waiting for a batch slot are refused.
        queue_policy = config.get("dynamic_batching", {}).get("default_queue_policy", {})
        self.engine = Engine(model, max_batch_size=int(params["max_batch_size"]),
                             max_seq_len=int(params["max_seq_len"]),
                             max_queue_size=int(queue_policy.get("max_queue_size", 0)))
        self.lock = threading.Lock()
        self.live = {}  # engine request id -> (triton request, its Triton request id)
        family = pb_utils.MetricFamily(name=REQUEST_METRICS, description="TRT LLM request metrics",
                                       kind=pb_utils.MetricFamily.GAUGE)
        self.active_gauge = family.Metric(labels={"model": "tensorrt_llm", "request_type": "active"})
        family.Metric(labels={"model": "tensorrt_llm", "request_type": "max"}).set(
            int(params["max_batch_size"]))
        self.metric_family = family  # metrics live as long as their family
        self.closing = threading.Event()
        self.watcher = threading.Thread(target=self._watch_cancellations, daemon=True)
        self.watcher.start()

    def execute(self, requests):
        for request in requests:
            self._submit(request)
        return None

    def _submit(self, request):
        sender = request.get_response_sender()
        inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
        if is_stop_request(inputs):
            self._cancel_by_triton_id(request.request_id())
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        try:
            engine_request = request_from_inputs(inputs)
        except (KeyError, TypeError, ValueError, UserError) as exc:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                coded(INVALID_ARGUMENT, f"invalid request: {exc}"), pb_utils.TritonError.INVALID_ARG)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        prompt_tokens = len(engine_request.input_ids)
        # only what the request asked for: see output_arrays for why nothing may be dropped later
        requested = set(request.requested_output_names())
        generated = [0]
        handle_box = []

        def on_event(event):
            generated[0] += len(event.tokens)
            flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if event.finished else 0
            if event.finished:
                # Forget the request before its final response: sending it frees the
                # request's response factory in the server, and is_cancelled() on it
                # afterwards is a use-after-free that kills the server (SIGSEGV in
                # TRITONBACKEND_ResponseFactoryIsCancelled). See _watch_cancellations.
                with self.lock:
                    self.live.pop(event.request_id, None)
                    self._count_active()
            if event.finish_reason == "error":
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(coded(INTERNAL, "engine step failed"))),
                            flags=flags)
            elif event.tokens or not event.finished:
                arrays = output_arrays(event.tokens, prompt_tokens, generated[0], requested)
                sender.send(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, a) for n, a in arrays.items()]), flags=flags)
            else:
                sender.send(flags=flags)

        with self.lock:  # hold the lock so on_event cannot pop before we register
            try:
                handle = self.engine.submit(engine_request, on_event)
            except QueueFull as exc:
                # As the tensorrtllm backend answers an executor that refused the request
                # (model_instance_state.cc, enqueue): INTERNAL, the exception's text, no code
                # of ours. The detokenizer turns that wording into a retryable `unavailable`.
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    str(exc), pb_utils.TritonError.INTERNAL)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            except UserError as exc:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    coded(INVALID_ARGUMENT, str(exc)), pb_utils.TritonError.INVALID_ARG)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            self.live[handle.id] = (request, request.request_id())
            self._count_active()

    def _cancel_by_triton_id(self, triton_id):
        with self.lock:
            matches = [engine_id for engine_id, (_, tid) in self.live.items() if tid == triton_id]
        for engine_id in matches:
            self.engine.cancel(engine_id)

    def _watch_cancellations(self):
        """A client that cancels its gRPC stream marks the request cancelled; the engine
        hears of it within one period, as the C++ backend's cancellation_check_period_ms."""
        while not self.closing.wait(CANCELLATION_CHECK_PERIOD_S):
            # Asked under the lock: a request still in `live` has not had its final
            # response sent (on_event removes it first), so its response factory exists.
            with self.lock:
                cancelled = [engine_id for engine_id, (request, _) in self.live.items()
                             if request.is_cancelled()]
            for engine_id in cancelled:
                self.engine.cancel(engine_id)

    def _count_active(self):
        # under self.lock; the gauge is gone once finalize has begun
        if self.active_gauge is not None:
            self.active_gauge.set(len(self.live))

    def finalize(self):
        self.closing.set()
        self.engine.shutdown(timeout=10)
        # Delete the metrics now, while the stub can still tell the server (a metric's
        # destructor does, through the stub's shared memory; left to the interpreter's exit
        # it runs after that memory is gone and segfaults the stub: python_backend r24.10
        # Metric::Clear). The metrics first, then their family.
        with self.lock:
            self.active_gauge = None
        self.metric_family = None
