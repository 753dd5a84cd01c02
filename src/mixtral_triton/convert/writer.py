"""Write the TensorRT-LLM checkpoint folder: rank{r}.safetensors, manifest.json, config.json.

Memory stays bounded whatever the model size: source tensors are read a block of at most
`chunk_bytes` at a time and each rank file is streamed to disk tensor by tensor, with the
safetensors header written first from the layout (safetensors' own save_file would need
every tensor of a rank in memory at once).

Crash safety: a rank is written under a temporary name, fsynced and renamed; only then does
manifest.json record its size and hash (xxh3_128: the manifest guards against truncated or
damaged files, not against tampering, and sha256 cost 4 of the 28 CPU-seconds of the
benchmark's conversion). A rerun trusts a rank file only if the manifest lists it with a
matching size and hash, so a rank cut off mid-way is written again.
config.json is removed while work is pending and written last, so a folder that has one is
complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import queue
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import xxhash

from mixtral_triton.errors import UserError
from mixtral_triton.progress import Progress
from mixtral_triton.convert.audit import audit, enforce, fp16_sources
from mixtral_triton.convert.layout import (DTYPES, SAFETENSORS_NAMES, Output, SourceCheckpoint, iter_values,
                                           one_torch_thread, piece_bytes, rank_layout, trtllm_config)
from mixtral_triton.convert.mapping import Parallel, check_model

CHUNK_BYTES = 16 * 2**20
# Peak memory of one worker in chunks, as measured on a real-shaped Mixtral (hidden 6144):
# about 4.75 (its stream's STREAM_BUFFERS blocks, the touched pages of the mapped source rows,
# the cast's staging), rounded up for the allocator's slack; the audit thread counts as one
# more worker. Larger chunks buy little speed.
WORKER_PEAK_CHUNKS = 6
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2


def convert(src: Path, out: Path, *, parallel: Parallel, dtype: str = "float16", workers: int = 1,
            memory_budget: int | None = None, clamp_fp16: bool = False, chunk_bytes: int = CHUNK_BYTES,
            log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Convert SRC into OUT (created if needed; resumed if it holds an unfinished run of the
    same conversion). Returns the manifest. `progress`: bars with time left on stderr
    (mixtral_triton.progress) for the writing and the float16 audit."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    workers = _workers_within_budget(workers, memory_budget, chunk_bytes, log)
    source = SourceCheckpoint(src)
    check_model(parallel, source.model)
    layouts = [rank_layout(source.model, parallel, rank, dtype) for rank in range(parallel.world_size)]
    for outputs in layouts:
        source.check(outputs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if not out.parent.is_dir():
        raise UserError(f"parent folder {out.parent} does not exist")

    settings = {"source": _fingerprint(source), "dtype": dtype, "tp_size": parallel.tp, "pp_size": parallel.pp,
                "moe_tp_size": parallel.moe_tp, "moe_ep_size": parallel.moe_ep, "clamp_fp16": clamp_fp16}
    manifest = load_manifest(out)
    if manifest is not None and manifest["settings"] != settings:
        raise UserError(f"{out} holds a conversion with other options or of another source; "
                        "remove it or choose another output folder")
    if manifest is None:
        manifest = {"format": MANIFEST_FORMAT, "settings": settings, "audit": None, "ranks": {}}
    created = not out.exists()
    audit_pool = audit_job = gate = None
    stop_audit = threading.Event()
    if dtype == "float16" and manifest["audit"] is None:
        def audited(threads: int) -> None:
            result = audit(source, fp16_sources(layouts), threads, chunk_bytes, stop_audit, progress)
            log(result.summary())
            enforce(result, clamp_fp16)
            manifest["audit"] = result.to_json()
        if memory_budget is None or memory_budget >= (workers + 1) * WORKER_PEAK_CHUNKS * chunk_bytes:
            # The audit reads the source in one thread of its own (one more worker's memory)
            # while the ranks are written, on another core; write_rank waits for it (`gate`)
            # before publishing a rank, so a failed audit still leaves nothing trusted.
            audit_pool = ThreadPoolExecutor(max_workers=1)
            audit_job = audit_pool.submit(audited, 1)
        else:
            audited(workers)  # no memory to run both at once: audit first, as a separate pass

    out.mkdir(exist_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a run that was killed
        stale.unlink()
    todo = [rank for rank in range(parallel.world_size) if not _finished(out, manifest, rank)]
    if todo:
        (out / "config.json").unlink(missing_ok=True)
    if audit_job is None:
        _write_json_atomic(out / MANIFEST, manifest)
    else:  # written, with the audit, once the audit has passed
        gate = _Once(audit_job.result, lambda: _write_json_atomic(out / MANIFEST, manifest))
    for rank in sorted(set(range(parallel.world_size)) - set(todo)):
        log(f"rank {rank}: already written and verified")

    try:
        _write_ranks(out, todo, layouts, source, manifest, clamp_fp16, chunk_bytes, workers, gate, log, progress)
        if gate is not None:
            gate()  # no rank was left to write: the audit must still pass and be recorded
    except BaseException:
        if audit_pool is not None:
            stop_audit.set()  # a failed conversion need not wait for the audit to finish
            audit_pool.shutdown()
            if created and not any(out.iterdir()):
                out.rmdir()  # as when the audit ran first: a refused conversion leaves no folder
        raise
    if audit_pool is not None:
        audit_pool.shutdown()
    _write_json_atomic(out / "config.json", trtllm_config(source.hf_config, source.model, parallel, dtype))
    log(f"wrote a TensorRT-LLM checkpoint for {parallel.world_size} ranks to {out}")
    return manifest


def _write_ranks(out: Path, todo: list[int], layouts: list[list[Output]], source: SourceCheckpoint, manifest: dict,
                 clamp_fp16: bool, chunk_bytes: int, workers: int, gate: Callable[[], None] | None, log,
                 progress: bool) -> None:
    """Write the ranks in `todo`, `workers` at a time, and publish each in a thread of its own:
    its fsync (seconds for gigabytes), the audit gate, the rename and the manifest entry, so
    the next rank's writing overlaps the disk catching up with the last one's."""
    failed = threading.Event()  # a rank failed to write or publish: start no new work

    def publish(rank: int, written: _Written) -> None:
        try:
            entry = publish_rank(out, rank, written, gate)
        except BaseException:
            failed.set()
            raise
        manifest["ranks"][str(rank)] = entry  # only this thread writes the manifest meanwhile
        _write_json_atomic(out / MANIFEST, manifest)
        log(f"rank {rank}: wrote {entry['file']} ({entry['bytes']} bytes)")

    def write(rank: int) -> Future:
        if failed.is_set():
            raise _Stopped()
        try:
            written = write_rank(out, rank, layouts[rank], source, clamp_fp16, chunk_bytes, failed, bar)
        except BaseException:
            failed.set()
            raise
        return publisher.submit(publish, rank, written)

    total = sum(tensor.nbytes for rank in todo for tensor in layouts[rank])
    with one_torch_thread(), Progress(total=total, desc="converting", unit="B", unit_scale=True,
                                      disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=1) as publisher:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            writes = [pool.submit(write, rank) for rank in todo]
            try:
                for future in writes:
                    future.exception()  # wait
            except BaseException:  # Ctrl-C: the ranks not yet started never start
                failed.set()
                for future in writes:
                    future.cancel()
                raise
        # Ranks written before a failure are still published (the publisher drains its queue).
        publishes = [future.result() for future in writes if future.exception() is None]
    errors = [future.exception() for future in writes + publishes if future.exception() is not None]
    # The first real error, not the _Stopped of ranks that merely saw it.
    errors = [exc for exc in errors if not isinstance(exc, _Stopped)] or errors
    if errors:
        raise errors[0]


class _Stopped(Exception):
    """A rank not written because another one failed."""


class _Written(NamedTuple):
    tmp: Path
    bytes: int
    xxh3_128: str


def write_rank(out: Path, rank: int, outputs: list[Output], source: SourceCheckpoint, clamp_fp16: bool,
               chunk_bytes: int, stop: threading.Event | None = None, bar: Progress | None = None) -> _Written:
    """Stream one rank into its temporary file (not yet fsynced: publish_rank does that);
    `stop` (another rank failed) ends it early."""
    tmp = out / f".rank{rank}.safetensors.tmp"
    header, offset = {}, 0
    for tensor in outputs:
        header[tensor.name] = {"dtype": SAFETENSORS_NAMES[DTYPES[tensor.dtype]], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # as safetensors does: the data starts 8-byte aligned
    try:
        with _RankStream(tmp, max(piece_bytes(tensor, chunk_bytes) for tensor in outputs)) as stream:
            stream.write(struct.pack("<Q", len(head)) + head)
            for tensor in outputs:
                if stop is not None and stop.is_set():
                    raise _Stopped()
                write_tensor(stream, tensor, source, clamp_fp16, chunk_bytes, bar)
            digest = stream.finish()
        size = tmp.stat().st_size
        if size != 8 + len(head) + offset:
            raise RuntimeError(f"{tmp} has {size} bytes, expected {8 + len(head) + offset}")
        return _Written(tmp, size, digest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_rank(out: Path, rank: int, written: _Written, gate: Callable[[], None] | None = None) -> dict:
    """fsync the written rank, wait for `gate` (the float16 audit), then give it its final
    name; returns its manifest entry. On any failure the temporary file is removed."""
    final = out / f"rank{rank}.safetensors"
    try:
        fd = os.open(written.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if gate is not None:
            gate()
        os.replace(written.tmp, final)
        _fsync_dir(out)
    except BaseException:
        written.tmp.unlink(missing_ok=True)
        raise
    return {"file": final.name, "bytes": written.bytes, "xxh3_128": written.xxh3_128}


def write_tensor(stream: _RankStream, tensor: Output, source: SourceCheckpoint, clamp_fp16: bool,
                 chunk_bytes: int, bar: Progress | None = None) -> None:
    written = 0
    for values in iter_values(tensor, source, clamp_fp16, chunk_bytes, into=stream.reserve):
        written += values.nbytes
        if bar is not None:
            bar.update(values.nbytes)
        del values  # the stream's buffer: holds no memory of its own
    if written != tensor.nbytes:
        raise RuntimeError(f"{tensor.name}: wrote {written} bytes, the layout says {tensor.nbytes}")


# O_DIRECT needs the file offset, the length and the buffer address of every write to be
# multiples of the device's logical block size (512 or 4096 bytes).
ALIGN = 4096
STREAM_BUFFERS = 3  # one being filled while two are hashed and written


class _RankStream:
    """The bytes of one rank file, written in large aligned blocks by a thread of its own,
    with O_DIRECT where the filesystem allows it, and hashed (xxh3_128) in that thread just
    before each block is written. The casts fill these blocks in place (`reserve`).

    Why O_DIRECT: through the page cache, write() was the converter's largest cost (the
    kernel allocating 7 GB of new cache pages and copying into them: about 40% of the
    CPU-seconds in the benchmark's profile), for pages nothing reads again. With O_DIRECT the
    disk takes the bytes from these buffers. Without it (tmpfs before Linux 6.6) the same
    writes go through the page cache. The last block is padded to ALIGN and the file then
    truncated to its size."""

    def __init__(self, path: Path, piece: int):
        # A piece must fit after the unaligned tail (< ALIGN) that a full block carries over.
        self.capacity = -(-(piece + ALIGN) // ALIGN) * ALIGN
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self._fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o666)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fd = os.open(path, flags, 0o666)
        # Anonymous mappings: page-aligned, as O_DIRECT needs, and reused for the whole rank
        # (new pages cost a page fault each; on this project's VMs a far slower one).
        buffers = [mmap.mmap(-1, self.capacity) for _ in range(STREAM_BUFFERS)]
        self._views = {id(b): torch.frombuffer(b, dtype=torch.uint8) for b in buffers}
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for buffer in buffers[1:]:
            self._free.put(buffer)
        self._current, self._filled, self.size = buffers[0], 0, 0
        self._digest = xxhash.xxh3_128()
        self._thread = ThreadPoolExecutor(max_workers=1)
        self._pending: deque[Future] = deque()

    def reserve(self, n: int) -> torch.Tensor:
        """The next n bytes of the file (at most the piece size), to be filled by the caller
        before its next call."""
        if self._filled + n > self.capacity:
            self._hand_over(final=False)
        view = self._views[id(self._current)][self._filled:self._filled + n]
        self._filled += n
        self.size += n
        return view

    def write(self, data: bytes) -> None:
        for start in range(0, len(data), self.capacity - ALIGN):
            piece = data[start:start + self.capacity - ALIGN]
            self.reserve(len(piece)).numpy()[:] = np.frombuffer(piece, dtype=np.uint8)

    def finish(self) -> str:
        """Write what is left, wait for every write, truncate the padding; the hex digest."""
        self._hand_over(final=True)
        while self._pending:
            self._pending.popleft().result()
        os.ftruncate(self._fd, self.size)
        return self._digest.hexdigest()

    def _hand_over(self, final: bool) -> None:
        """Queue the filled part of the current block (its aligned part, unless final) for
        writing, and carry the rest over to the start of a free block."""
        full, filled = self._current, self._filled
        whole = filled if final else filled - filled % ALIGN  # never 0 when not final: see capacity
        padded = -(-whole // ALIGN) * ALIGN
        self._views[id(full)][whole:padded].zero_()
        if padded:
            self._pending.append(self._thread.submit(self._write, full, whole, padded))
        if not final:
            self._current = self._free.get()  # every write gives its block back, even a failed one
            self._views[id(self._current)][:filled - whole] = self._views[id(full)][whole:filled]
            self._filled = filled - whole
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()  # a failed write fails the rank now

    def _write(self, buffer: mmap.mmap, length: int, padded: int) -> None:
        try:
            with memoryview(buffer) as view:
                self._digest.update(view[:length])
                done = 0
                while done < padded:
                    done += os.write(self._fd, view[done:padded])
        finally:
            self._free.put(buffer)

    def __enter__(self) -> _RankStream:
        return self

    def __exit__(self, *exc) -> None:
        self._thread.shutdown(cancel_futures=True)
        os.close(self._fd)


class _Once:
    """Calls `first` then `then` once, whichever thread asks first; the others wait for it.
    An error is raised again to every caller."""

    def __init__(self, first: Callable[[], object], then: Callable[[], object] = lambda: None):
        self._steps, self._lock, self._error, self._done = (first, then), threading.Lock(), None, False

    def __call__(self) -> None:
        with self._lock:
            if not self._done:
                try:
                    for step in self._steps:
                        step()
                except BaseException as exc:
                    self._error = exc
                self._done = True
            if self._error is not None:
                raise self._error


def load_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not a manifest this converter wrote; remove {out} or choose another folder")
    return manifest


def file_digest(path: Path, bar: Progress | None = None) -> str:
    """A file's xxh3_128, as the manifest records it."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(8 * 2**20):
            digest.update(block)
            if bar is not None:
                bar.update(len(block))
    return digest.hexdigest()


def _finished(out: Path, manifest: dict, rank: int) -> bool:
    """A rank counts as written only if the manifest has it and the file still matches."""
    entry = manifest["ranks"].get(str(rank))
    path = out / f"rank{rank}.safetensors"
    if entry and path.is_file() and path.stat().st_size == entry["bytes"] and file_digest(path) == entry["xxh3_128"]:
        return True
    manifest["ranks"].pop(str(rank), None)
    return False


def _workers_within_budget(workers: int, memory_budget: int | None, chunk_bytes: int, log) -> int:
    if memory_budget is None:
        return workers
    per_worker = WORKER_PEAK_CHUNKS * chunk_bytes
    if memory_budget < per_worker:
        raise UserError(f"--memory-budget {memory_budget} bytes is below the {per_worker} bytes one worker needs")
    allowed = min(workers, memory_budget // per_worker)
    if allowed < workers:
        log(f"--memory-budget allows {allowed} of the {workers} workers")
    return allowed


def _fingerprint(source: SourceCheckpoint) -> str:
    """Identifies the source for resuming: its config, index and shard names and sizes."""
    digest = hashlib.sha256()
    for path in [source.folder / "config.json", source.folder / "model.safetensors.index.json"]:
        if path.is_file():
            digest.update(path.read_bytes())
    for path in source.files:
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=4)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
