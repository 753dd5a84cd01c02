"""The reference engine alone, in the benchmark's own process, no Triton: the engine's own
scaling with batch, the floor under every served path."""

from __future__ import annotations

import time
from pathlib import Path

from mixtral_triton.bench.uncertainty import median_interval
from mixtral_triton.bench.workload import Prompt, Shape


def in_process_engine(checkpoint_dir: Path, prompts: list[Prompt], shape: Shape, batches, max_batch_size: int,
                      repeats: int, log) -> dict:
    """The reference engine alone, in this process, no Triton: the engine's own scaling with
    batch, the floor under every served path. One torch thread, as the served model."""
    import torch

    from mixtral_triton.reference import Engine, ReferenceModel
    from mixtral_triton.reference.engine import Request
    from mixtral_triton.reference.sampling import SamplingParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = ReferenceModel.from_trtllm_checkpoint(checkpoint_dir)
        out = {}
        with Engine(model, max_batch_size=max_batch_size) as engine:
            warm = engine.submit(Request(input_ids=list(prompts[0].token_ids), max_tokens=4))
            warm.result(timeout=60)
            for batch in batches:
                rates = []
                for _ in range(repeats):
                    requests = [Request(input_ids=list(prompts[i % len(prompts)].token_ids),
                                        max_tokens=shape.output_tokens, end_id=2,
                                        sampling=SamplingParams(top_k=1, min_tokens=shape.output_tokens))
                                for i in range(batch)]
                    start = time.perf_counter()
                    handles = [engine.submit(r) for r in requests]
                    tokens = sum(len(h.result(timeout=600)[0]) for h in handles)
                    rates.append(tokens / (time.perf_counter() - start))
                estimate = median_interval(rates)
                out[str(batch)] = {"output_tokens_per_s_rounds": rates, "output_tokens_per_s": estimate.median,
                                   "output_tokens_per_s_estimate": estimate.to_dict(),
                                   "step_ms": batch / estimate.median * 1000}
                log(f"  in-process engine {shape.label} batch {batch}: {estimate.median:.1f} tok/s "
                    f"({batch / estimate.median * 1000:.1f} ms/step, median of {repeats})")
        return out
    finally:
        torch.set_num_threads(threads)
