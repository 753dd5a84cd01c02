"""Check an ensemble's wiring as Triton 2.51 does when it loads it, but all problems at
once and without a server: names, types and shapes at both ends of every ensemble
tensor, unused tensors, and the rule that a step after a decoupled model reads only that
model's lineage."""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, NamedTuple

from tritonclient.grpc.model_config_pb2 import DataType, ModelConfig

# The lineage of tensors that come from the request itself rather than a decoupled model.
_REQUEST = ""
_UNKNOWN = None


class _End(NamedTuple):
    """One place an ensemble tensor is declared: an ensemble input/output or a step's."""

    where: str
    data_type: int
    dims: tuple[int, ...]


def wiring_problems(configs: Mapping[str, ModelConfig], ensemble: str = "ensemble") -> list[str]:
    """Every wiring problem of the ensemble named `ensemble` among `configs` (by model name)."""
    ens = configs[ensemble]
    problems: list[str] = []
    ends: dict[str, list[_End]] = defaultdict(list)
    reads: dict[str, int] = defaultdict(int)
    writer: dict[str, str] = {}

    # Triton compares the ensemble's own tensors by their reshape, if any.
    for kind, tensors in (("input", ens.input), ("output", ens.output)):
        for t in tensors:
            dims = tuple(t.reshape.shape) if t.HasField("reshape") else tuple(t.dims)
            ends[t.name].append(_End(f"ensemble {kind} {t.name!r}", t.data_type, dims))
    for t in ens.input:
        writer[t.name] = "the request"

    steps = []
    for step in ens.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"step {step.model_name!r}: no such model in the repository")
            continue
        steps.append((step, model))
        name = step.model_name
        if 0 < model.max_batch_size < ens.max_batch_size:
            problems.append(f"{name}: max_batch_size {model.max_batch_size} is below the "
                            f"ensemble's {ens.max_batch_size}")
        inputs = {t.name: t for t in model.input}
        outputs = {t.name: t for t in model.output}
        for key, tensor in step.input_map.items():
            if key not in inputs:
                problems.append(f"{name}: no input {key!r} (mapped from {tensor!r})")
                continue
            ends[tensor].append(_End(f"{name} input {key!r}", inputs[key].data_type,
                                     tuple(inputs[key].dims)))
            reads[tensor] += 1
        for t in model.input:
            if not t.optional and t.name not in step.input_map:
                problems.append(f"{name}: required input {t.name!r} is not mapped")
        for key, tensor in step.output_map.items():
            if key not in outputs:
                problems.append(f"{name}: no output {key!r} (mapped to {tensor!r})")
                continue
            if tensor in writer:
                problems.append(f"ensemble tensor {tensor!r} is written by both "
                                f"{writer[tensor]} and {name}")
            writer[tensor] = name
            ends[tensor].append(_End(f"{name} output {key!r}", outputs[key].data_type,
                                     tuple(outputs[key].dims)))

    problems += _consistency_problems(ends)
    ensemble_outputs = {t.name for t in ens.output}
    for tensor in ends:
        if tensor not in writer:
            problems.append(f"ensemble tensor {tensor!r} is never written")
        elif not reads[tensor] and tensor not in ensemble_outputs:
            problems.append(f"ensemble tensor {tensor!r} is unused")
    problems += _lineage_problems(steps, ens)
    return problems


def _consistency_problems(ends: Mapping[str, list[_End]]) -> list[str]:
    problems = []
    for tensor, declared in ends.items():
        first = declared[0]
        for other in declared[1:]:
            if other.data_type != first.data_type:
                problems.append(f"ensemble tensor {tensor!r}: {DataType.Name(first.data_type)} "
                                f"at {first.where} but {DataType.Name(other.data_type)} at "
                                f"{other.where}")
            elif not _dims_match(first.dims, other.dims):
                problems.append(f"ensemble tensor {tensor!r}: dims {list(first.dims)} at "
                                f"{first.where} but {list(other.dims)} at {other.where}")
    return problems


def _lineage_problems(steps: list, ens: ModelConfig) -> list[str]:
    """Triton's decoupled rule: each step, and the set of ensemble outputs, must draw only
    on tensors of one lineage: the request's, or that of the latest decoupled model."""
    problems = []
    lineage = {t.name: _REQUEST for t in ens.input}
    pending = list(steps)
    while pending:
        ready = next((i for i, (step, _) in enumerate(pending)
                      if all(t in lineage for t in step.input_map.values())), None)
        if ready is None:
            break  # the rest read tensors nobody writes, reported already
        step, model = pending.pop(ready)
        origins = {lineage[t] for t in step.input_map.values()} - {_UNKNOWN}
        if len(origins) > 1:
            problems.append(f"{step.model_name}: reads tensors from different decoupled "
                            f"lineages ({_lineages(origins)})")
        if model.model_transaction_policy.decoupled:
            origin = step.model_name
        else:  # after a conflict, reported once above, the lineage is unknown
            origin = origins.pop() if len(origins) == 1 else _UNKNOWN
        for tensor in step.output_map.values():
            lineage[tensor] = origin
    origins = {lineage[t.name] for t in ens.output if t.name in lineage} - {_UNKNOWN}
    if len(origins) > 1:
        problems.append(f"ensemble outputs come from different decoupled lineages "
                        f"({_lineages(origins)})")
    return problems


def _dims_match(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def _lineages(origins: set[str]) -> str:
    return ", ".join(sorted(o or "the request" for o in origins))
