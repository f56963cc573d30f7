"""The flash neuron store: FFN bundles in a fixed DRAM budget, read from flash on demand.

Per layer a preallocated `NeuronCache` holds the bundles of the neurons in use. A step
(one forward pass of the model, one token when decoding) asks each layer for the
neurons it needs; those not resident are read from ffn.bin (`ColdReader`: page-aligned,
adjacent neurons merged into one read, several reads in flight) and appended to the
cache. After the step, windowing deletes the neurons no step of the last `window` used
("LLM in a Flash", section 3.1): only newly needed neurons are ever read, and windowing
decides only where a neuron's weights come from, never which neurons are used.

Worked example (window 2, one layer): step 0 needs {1, 2, 3}: reads all three. Step 1
needs {2, 4}: reads only 4; afterwards 1 and 3 stay (used at step 0, within the window).
Step 2 needs {4, 5}: reads 5; afterwards 1 and 3 (last used at step 0) are deleted and
{2, 4, 5} stay resident.

Reads overlap compute: when a step fits the cache, the missing neurons are read in the
background while the resident ones are multiplied, and come last (`stream`).

Budget: the store sizes everything it allocates (caches, read buffers, the scratch of one
compute chunk) when it is built, from `budget_bytes` minus the model's resident weights,
and never allocates more. The cache rows are split across layers by how many neurons
each uses (`plan_memory`'s demand). When a step needs more neurons than a layer's cache
holds, the layer is computed in chunks that fit, streaming through the cache.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_node.flash import fused
from edge_node.flash.bundle import ALL_SEGMENTS
from edge_node.flash.cache import NeuronCache
from edge_node.flash.pack import PAGE, FlashManifest
from edge_node.flash.reader import ColdReader, Extent, PendingReads, plan_reads

MiB = 1 << 20
MIN_CHUNK = 128  # rows: smaller chunks cost more in per-chunk overhead than they save


class BudgetError(ValueError):
    """The DRAM budget cannot hold the model; the message gives the minimum that works."""


@dataclass(frozen=True)
class StoreOptions:
    """How the store reads and keeps neurons (the defaults are the full method)."""

    # Steps a used neuron stays resident after its last use (k); 0: none. The rows are
    # preallocated, so a long window costs no memory: neurons leave when the cache needs
    # their rows (LRU eviction) rather than after the paper's k = 5 steps, with which the
    # wide benchmark model reads half again as often (207 against 137 reads per token).
    window: int = 64
    merge_reads: bool = True  # join reads of neighbouring neurons into one larger read
    merge_gap: int = 0  # ... also across up to this many unneeded bytes (read, then dropped)
    bundled_reads: bool = True  # one read per bundle; False reads gate, up, down apart
    io_threads: int = 4  # reads in flight at once; each thread owns one read buffer
    read_bytes: int = 128 * 1024  # size of each read buffer: the largest single read
    chunk_rows: int = 1024  # most neurons decoded and multiplied at once (scratch size)
    direct_io: bool | None = None  # O_DIRECT; None: when available, else fadvise cold cache

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError(f"window: must be >= 0, got {self.window}")
        if not 1 <= self.io_threads <= 64:
            raise ValueError(f"io_threads: must be in [1, 64], got {self.io_threads}")
        if self.read_bytes < PAGE or self.read_bytes % PAGE:
            raise ValueError(f"read_bytes: must be a multiple of {PAGE}, got {self.read_bytes}")
        if self.merge_gap < 0:
            raise ValueError(f"merge_gap: must be >= 0, got {self.merge_gap}")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows: must be >= 1, got {self.chunk_rows}")


@dataclass(frozen=True)
class MemoryPlan:
    """Where the budget goes, in bytes. total <= budget."""

    budget: int
    resident: int  # model weights outside the store: dram.safetensors tensors, predictors
    rows: tuple[int, ...]  # neuron cache rows of each layer
    chunk_rows: int  # neurons per compute chunk: the option, at most min(rows) // 2
    cache: int  # all layers' neuron caches
    buffers: int  # read buffers
    scratch: int  # one chunk's gathered bundles and decoded weights

    @property
    def total(self) -> int:
        return self.resident + self.cache + self.buffers + self.scratch


def plan_memory(
    manifest: FlashManifest,
    budget: int,
    resident: int,
    options: StoreOptions,
    decoded_row: int,
    demand: Sequence[float] | None = None,
) -> MemoryPlan:
    """The largest neuron caches that fit `budget`; BudgetError names the minimum.

    decoded_row: bytes one neuron's weights take once decoded into the compute dtype
    (0 when bundles are used in place).
    demand: each layer's share of neurons used per token (the predictors' calibration
    report); the cache rows are split in proportion, so a layer that uses 60% of its
    neurons is not starved while one that uses 15% keeps rows it never fills. None:
    the same for every layer.
    """
    layers, payload = manifest.config.n_layers, manifest.payload
    need = -(-payload // PAGE) * PAGE + PAGE
    if options.read_bytes < need:
        raise ValueError(
            f"read_bytes: must be >= {need} to hold one bundle, got {options.read_bytes}"
        )
    minimum = minimum_budget(manifest, resident, options, decoded_row)
    if budget < minimum:
        raise BudgetError(
            f"budget: {budget:,} bytes ({budget / MiB:.2f} MiB) is below the minimum "
            f"{minimum:,} bytes ({minimum / MiB:.2f} MiB): resident weights {resident:,}, "
            f"read buffers {options.io_threads * options.read_bytes:,}, and one "
            f"{payload}-byte neuron per layer"
        )
    if demand is not None and (len(demand) != layers or min(demand) <= 0):
        raise ValueError(f"demand: must be {layers} positive shares, got {list(demand)}")
    buffers = options.io_threads * options.read_bytes
    scratch_row = payload + decoded_row
    free = budget - resident - buffers
    hidden = manifest.config.hidden_dim
    shares = demand or [1.0] * layers

    def rows_for(chunk: int) -> tuple[int, ...]:
        return split_rows((free - chunk * scratch_row) // payload, shares, hidden)

    def fits(chunk: int) -> bool:  # a chunk is at most half the smallest cache
        rows = rows_for(chunk)
        return bool(rows) and min(rows) // 2 >= chunk

    # The largest chunk that fits: fewer chunk rows leave more cache rows, so binary search.
    # The scratch takes at most an eighth of the store, down to 128-row chunks: past that,
    # cache rows (fewer reads) are worth more than larger chunks (fewer, larger products).
    low, high = 1, min(options.chunk_rows, max(MIN_CHUNK, free // 8 // scratch_row))
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    chunk = low
    rows = rows_for(chunk)
    return MemoryPlan(
        budget=budget,
        resident=resident,
        rows=rows,
        chunk_rows=chunk,
        cache=sum(rows) * payload,
        buffers=buffers,
        scratch=chunk * scratch_row,
    )


def split_rows(total: int, shares: Sequence[float], hidden: int) -> tuple[int, ...]:
    """`total` cache rows over layers in proportion to `shares`, one at least and `hidden`
    (the whole layer) at most each; what a full layer cannot take goes to the others.

    Example: total 10, shares [3, 1, 1], hidden 4 -> [4, 3, 3].
    """
    layers = len(shares)
    if total < layers:
        return ()
    rows = [1] * layers
    open_layers = set(range(layers))
    left = total - layers
    while left > 0 and open_layers:
        weight = sum(shares[i] for i in open_layers)
        full = {i for i in open_layers if rows[i] + left * shares[i] / weight >= hidden}
        if not full:
            for i in open_layers:
                rows[i] += int(left * shares[i] / weight)
            break
        for i in full:
            left -= hidden - rows[i]
            rows[i] = hidden
        open_layers -= full
    return tuple(rows)


def minimum_budget(
    manifest: FlashManifest, resident: int, options: StoreOptions, decoded_row: int
) -> int:
    """The smallest budget `plan_memory` accepts: one cached neuron per layer."""
    layers, payload = manifest.config.n_layers, manifest.payload
    buffers = options.io_threads * options.read_bytes
    return resident + buffers + layers * payload + payload + decoded_row


@dataclass
class StepMetrics:
    """One step (model forward pass) summed over layers."""

    tokens: int = 0  # positions in the forward pass (batch * time)
    needed: int = 0  # neuron uses asked for
    computed: int = 0  # of which multiplied: the rest were inactive (ReLU zero) once seen
    hits: int = 0  # of which already resident
    neurons_read: int = 0
    bytes_read: int = 0
    reads: int = 0
    io_s: float = 0.0  # reads in flight, from submission to the last delivery
    io_wait_s: float = 0.0  # of which the FFN waited (the rest overlapped compute)
    predictor_s: float = 0.0
    compute_s: float = 0.0  # FFN decode and matmuls, bookkeeping

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needed if self.needed else 1.0

    @property
    def mean_read_bytes(self) -> float:
        return self.bytes_read / self.reads if self.reads else 0.0


@dataclass
class StoreTotals:
    steps: int = 0
    metrics: StepMetrics = field(default_factory=StepMetrics)


class FlashStore:
    """Neuron caches for every layer of one pack, filled from its ffn.bin.

    Not re-entrant: a layer's `stream`/`finish` sequence runs under `lock` (the
    flash FFN takes it), so concurrent generations share the store safely.
    """

    def __init__(
        self,
        pack_dir: str | Path,
        manifest: FlashManifest,
        plan: MemoryPlan,
        options: StoreOptions,
        compute_dtype: torch.dtype,
        *,
        history: int = 4096,
    ) -> None:
        self.manifest = manifest
        self.plan = plan
        self.options = options
        self.compute_dtype = compute_dtype
        config = manifest.config
        self.reader = ColdReader(
            Path(pack_dir) / manifest.ffn.name,
            threads=options.io_threads,
            buffer_bytes=options.read_bytes,
            direct=options.direct_io,
        )
        self.caches = [NeuronCache(config.hidden_dim, rows, manifest.payload) for rows in plan.rows]
        self._gathered = torch.empty(plan.chunk_rows, manifest.payload, dtype=torch.uint8)
        decodes = plan.scratch > plan.chunk_rows * manifest.payload
        self._decoded = (
            torch.empty(plan.chunk_rows, 3, config.dim, dtype=compute_dtype) if decodes else None
        )
        self.fused = fused.supported(manifest.bundle)  # codes(), down_products() work
        self.lock = threading.Lock()
        self.history: deque[StepMetrics] = deque(maxlen=history)
        self.totals = StoreTotals()
        self._step = StepMetrics()
        self._layer_wait_s = 0.0

    @property
    def io_mode(self) -> str:
        return self.reader.mode

    def allocated_bytes(self) -> int:
        """Bytes the store holds now, counted from its own tensors and buffers."""
        caches = sum(c.rows.numel() for c in self.caches)
        scratch = self._gathered.numel()
        if self._decoded is not None:
            scratch += self._decoded.numel() * self._decoded.element_size()
        return caches + scratch + self.reader.memory_bytes

    def resident(self, layer: int) -> set[int]:
        return set(self.caches[layer].resident().tolist())

    @property
    def code_rows(self) -> int:
        """The most neurons `codes` takes at once (its scratch holds codes only)."""
        return self._gathered.numel() // self.manifest.config.dim

    def stream(
        self, layer: int, needed: torch.Tensor, piece_rows: int | None = None
    ) -> Iterator[torch.Tensor]:
        """`layer`'s part of a step that uses `needed` ((n,) ascending ids), in pieces.

        Yields consecutive pieces of chunk_rows neurons at most, each resident by then:
        take its weights with `weights` before asking for the next piece. piece_rows:
        larger pieces when the step fits the cache (`code_rows` for `codes`): fewer,
        larger products.

        When the step fits the cache (decoding, small batches), the neurons not resident
        are read in the background while the resident ones are yielded (and multiplied),
        so reading overlaps compute; the neurons just read come last. When it does not,
        its pieces stream through one half of the cache while the other half keeps what
        the next step will want first (`NeuronCache.evict`), each read before it is used.
        """
        cache = self.caches[layer]
        self._step.needed += len(needed)
        if len(needed) > cache.capacity:
            for piece in needed.split(self.plan.chunk_rows):
                missing = piece[cache.slot_of.index_select(0, piece) < 0]
                self._step.hits += len(piece) - len(missing)
                if len(missing):
                    self._wait(self._fetch(layer, missing, piece, needed))
                cache.last_used.index_fill_(0, piece, cache.step)
                yield piece
            return
        resident = cache.slot_of.index_select(0, needed) >= 0
        hits, missing = needed[resident], needed[~resident]
        self._step.hits += len(hits)
        pending = self._fetch(layer, missing, needed, needed) if len(missing) else None
        cache.last_used.index_fill_(0, needed, cache.step)
        rows = piece_rows or self.plan.chunk_rows
        try:
            yield from hits.split(rows)
        finally:  # also when the caller stops early: no read may still write into the cache
            if pending is not None:
                self._wait(pending)
        yield from missing.split(rows)

    def weights(
        self, layer: int, neurons: torch.Tensor, segments: slice = ALL_SEGMENTS
    ) -> torch.Tensor:
        """Weights (k, segments, dim) of resident `neurons` (at most chunk_rows) in the
        compute dtype: `segments` of [gate, up, down]. Only those segments' bytes are
        gathered and decoded, so a caller that learns from the gate which neurons are
        inactive decodes up and down for the others only.

        The result lives in the store's scratch: use it before the next `weights`.
        """
        bundle, cache = self.manifest.bundle, self.caches[layer]
        size = bundle.segment_bytes
        start, stop, _ = segments.indices(3)
        k, nbytes = len(neurons), (stop - start) * size
        rows = torch.index_select(
            cache.rows[:, start * size : stop * size],
            0,
            cache.slot_of.index_select(0, neurons),
            out=self._gathered.view(-1)[: k * nbytes].view(k, nbytes),
        )
        out = None
        if self._decoded is not None:
            dim = self.manifest.config.dim
            out = self._decoded.view(-1)[: k * (stop - start) * dim].view(k, stop - start, dim)
        return bundle.decode(rows, self.compute_dtype, out)

    def slots(self, layer: int, neurons: torch.Tensor) -> torch.Tensor:
        """Cache rows of resident `neurons`, for `codes` and `down_products` (a piece asks
        for them once)."""
        return self.caches[layer].slot_of.index_select(0, neurons)

    def codes(self, layer: int, slots: torch.Tensor, segment: int) -> tuple[torch.Tensor, ...]:
        """int8 codes (k, dim) and float32 scales (k,) of `segment` (0 gate, 1 up) of the
        neurons in cache rows `slots` (at most code_rows), for packs the fused path takes
        (`fused`): the codes are gathered into the scratch and not decoded. Use them
        before the next `codes` or `weights`."""
        cache, dim = self.caches[layer], self.manifest.config.dim
        start = segment * self.manifest.bundle.segment_bytes
        k = len(slots)
        codes = torch.index_select(
            cache.rows[:, start : start + dim],
            0,
            slots,
            out=self._gathered.view(-1)[: k * dim].view(k, dim),
        )
        # The rows as float32 (fused packs keep dim % 16 == 0): one column is the scales.
        scales = cache.rows.view(torch.float32)[:, (start + dim) // 4].index_select(0, slots)
        codes.bitwise_xor_(fused.MIXED_SIGN)
        return codes.view(torch.int8), scales

    def down_products(self, layer: int, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights[:, i] * down_i over the neurons in cache rows `slots` (k,), weights
        (m, k): (m, dim) float32, computed on the cache rows in place (fused packs)."""
        table = self.caches[layer].rows.view(-1, self.manifest.bundle.segment_bytes)
        return fused.weighted_rows(table, slots * 3 + 2, weights)

    def _fetch(
        self, layer: int, missing: torch.Tensor, keep: torch.Tensor, needed: torch.Tensor
    ) -> PendingReads:
        """Makes room for `missing` (evicting outside `keep`), gives them slots and starts
        reading them into those."""
        cache = self.caches[layer]
        overflow = cache.count + len(missing) - cache.capacity
        if overflow > 0:
            cache.evict(overflow, keep, needed)
        return self._read(layer, cache, missing, cache.insert(missing))

    def _wait(self, pending: PendingReads) -> None:
        start = time.perf_counter()
        self._step.io_s += pending.wait()
        self._layer_wait_s += time.perf_counter() - start

    def finish(
        self,
        layer: int,
        *,
        tokens: int = 0,
        computed: int = 0,
        predictor_s: float = 0.0,
        ffn_s: float = 0.0,
    ) -> None:
        """Ends `layer`'s part of a step: windowing, and metrics (a step ends at the last
        layer). ffn_s: the layer's time in `stream`, `weights` and its matmuls; the time spent
        waiting for reads is taken out."""
        self.caches[layer].end_step(self.options.window)
        step = self._step
        step.tokens = max(step.tokens, tokens)
        step.computed += computed
        step.predictor_s += predictor_s
        step.io_wait_s += self._layer_wait_s
        step.compute_s += max(0.0, ffn_s - self._layer_wait_s)
        self._layer_wait_s = 0.0
        if layer == len(self.caches) - 1:
            self.history.append(step)
            self._add_to_totals(step)
            self._step = StepMetrics()

    def _add_to_totals(self, step: StepMetrics) -> None:
        totals = self.totals.metrics
        self.totals.steps += 1
        for name in StepMetrics.__dataclass_fields__:
            setattr(totals, name, getattr(totals, name) + getattr(step, name))

    def _read(
        self, layer: int, cache: NeuronCache, neurons: torch.Tensor, slots: torch.Tensor
    ) -> PendingReads:
        """Starts reading `neurons`' bundles (ascending) into cache rows `slots`
        (consecutive, from `NeuronCache.insert`)."""
        manifest = self.manifest
        bases = manifest.layer_offsets[layer] + neurons.numpy() * manifest.stride
        if self.options.bundled_reads:
            groups = [(bases, 0, manifest.payload)]
        else:
            groups = [(bases + s.offset, s.offset, s.nbytes) for s in manifest.bundle.segments]
        jobs = []
        for offsets, dst, nbytes in groups:
            extents = plan_reads(
                offsets,
                nbytes,
                page=PAGE,
                max_bytes=self.options.read_bytes,
                merge=self.options.merge_reads,
                gap=self.options.merge_gap,
            )
            copier = _Copier(cache.rows.numpy(), offsets, int(slots[0]), dst, nbytes)
            jobs.extend((extent, copier) for extent in extents)
        step = self._step
        step.reads += len(jobs)
        step.bytes_read += sum(extent.length for extent, _ in jobs)
        step.neurons_read += len(neurons)
        return self.reader.submit(jobs)

    def close(self) -> None:
        self.reader.close()


class _Copier:
    """Copies the pieces an extent brought in into their cache rows (a `Deliver`).

    The slots of one read are consecutive (insertion appends), so an extent's pieces go
    in one gather from the read buffer (at their byte positions in it) straight into a
    slice of the rows: C loops on the reading thread, no Python per piece.
    """

    def __init__(
        self, rows: np.ndarray, offsets: np.ndarray, first_slot: int, dst: int, nbytes: int
    ) -> None:
        self.rows, self.offsets, self.first_slot = rows, offsets, first_slot
        self.dst, self.nbytes = dst, nbytes

    def __call__(self, extent: Extent, view: memoryview) -> None:
        # Row r of `windows` is the nbytes starting at byte r of what was read.
        windows = np.ndarray(
            (extent.length - self.nbytes + 1, self.nbytes), np.uint8, buffer=view, strides=(1, 1)
        )
        slots = slice(self.first_slot + extent.first, self.first_slot + extent.last)
        starts = self.offsets[extent.first : extent.last] - extent.offset
        self.rows[slots, self.dst : self.dst + self.nbytes] = windows[starts]
