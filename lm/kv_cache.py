"""Preallocated key/value cache for many independent sequences ("rows").

A forward pass appends its T new tokens to a row as *pending* entries. Afterwards the
caller decides which of them to keep: `commit(row, range(T))` keeps a whole chain,
`commit(row, path)` keeps one root-to-node path of a token tree, and doing nothing
discards them all. Committed lengths live on the host (`lengths`), so building the next
forward's indices never waits for the GPU.

Example (one row, 3 tokens committed, then a forward over a tree of 4 nodes)::

    positions in the row:  0 1 2 | 3 4 5 6      lengths[row] == 3, pending == 4
    commit(row, [0, 2])    keeps tree nodes 0 and 2: entry 5 moves to 4; lengths[row] == 5

What a position holds depends on the attention (`cache_layout`): grouped-query attention
caches a key and a value per KV head; multi-head latent attention caches one latent
vector per token, which every head reads. Every operation here works on either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lm.config import ModelConfig
from lm.device import default_device, default_dtype, host_to_device


def cache_layout(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """The buffers a cache holds for `config`'s attention: name -> (heads, width) that one
    token takes in one layer.

    Grouped-query attention: a key "k" and a value "v" per KV head. Multi-head latent
    attention (DeepSeek-V2/V3): one "latent" entry, the kv_lora_rank-wide compressed
    key/value followed by the head_dim-wide rotated key, shared by every query head
    (`lm.model.LatentAttention` reads it with the up-projections absorbed).
    """
    if config.mla:
        assert config.kv_lora_rank is not None  # ModelConfig checks it for MLA
        return {"latent": (1, config.kv_lora_rank + config.head_dim)}
    return {"k": (config.n_kv_heads, config.head_dim), "v": (config.n_kv_heads, config.head_dim)}


def bytes_per_position(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token takes in one cache row, every layer, so a cache of R rows x L
    positions takes R * L times this.

    Example: SmolLM2-135M (30 layers, 3 KV heads x 64) in float32 takes
    2 x 30 x 3 x 64 x 4 = 46080 bytes a position: 755 MB for 2 rows x 8192 positions.
    DeepSeek-V3's MLA (61 layers, latent 512 + 64) in bfloat16: 61 x 576 x 2 = 70272.
    """
    width = sum(heads * dim for heads, dim in cache_layout(config).values())
    return config.n_layers * width * dtype.itemsize


def ring_length(config: ModelConfig, max_len: int, window_slack: int) -> int | None:
    """Entries a sliding-window layer keeps per row: its window plus `window_slack` (the
    largest tree or chunk a pass may discard, or a drafter's tree committed among the
    history, without losing an entry the next pass's window needs); None when that is
    not shorter than max_len, or the model has no window (every layer keeps all)."""
    if config.sliding_window is None or config.sliding_window + window_slack >= max_len:
        return None
    return config.sliding_window + window_slack


def row_bytes(
    config: ModelConfig, dtype: torch.dtype, max_len: int, window_slack: int = 256
) -> int:
    """Bytes one cache row of max_len positions takes (`KVCache.nbytes` / rows).

    Example: Gemma 3 270M in bfloat16 (18 layers, 1 KV head x 256; 15 with a window of
    512) at 32768 positions: 3 x 32768 x 1024 + 15 x 768 x 1024 = 112 MB, not 604 MB.
    """
    ring = ring_length(config, max_len, window_slack)
    if ring is None:
        return max_len * bytes_per_position(config, dtype)
    per_layer = bytes_per_position(config, dtype) // config.n_layers
    ring_layers = len(config.sliding_layers)
    return per_layer * ((config.n_layers - ring_layers) * max_len + ring_layers * ring)


@dataclass(frozen=True)
class CacheStep:
    """Where one forward pass writes and reads in the cache.

    rows: (batch,) cache row per batch row, on the cache's device.
    row_slice: the same rows as a slice when they are consecutive (reads need no copy).
    starts: (batch,) committed length of each row; the new tokens go right after.
    write_positions: (batch, time) = starts[:, None] + arange(time).
    kv_len: keys are read up to this position, max(starts) + time.
    write_slice: write_positions as one slice when the rows are consecutive and share
        their start (a single sequence always): the write is a plain copy, no scatter.
    """

    rows: torch.Tensor
    row_slice: slice | None
    starts: torch.Tensor
    write_positions: torch.Tensor
    kv_len: int
    write_slice: slice | None = None
    window: WindowStep | None = None  # with sliding-window layers in rings


@dataclass(frozen=True)
class WindowStep:
    """Where one forward pass reads and writes the sliding-window layers' rings.

    Those layers attend to their committed tail, the last `tail` entries of each row
    before its start, read from the ring, followed by the new tokens as computed (so a
    pass may hold more new tokens than the ring). Their keys' columns are
    `columns` (batch, tail + time): each column's entry index in its row, -1 where a row
    is shorter than the tail; `valid` (batch, tail + time) says which tail columns the
    ring still holds. tail_slots (batch, tail): the tail's ring slots; write_slots
    (batch, time - write_from): where the last new tokens go (only the last `ring` of a
    long pass are kept).
    """

    columns: torch.Tensor
    valid: torch.Tensor
    tail_slots: torch.Tensor
    write_slots: torch.Tensor
    write_from: int


class KVCache(nn.Module):
    """Per-token buffers named by `cache_layout`, each (layers, rows, heads, max_len,
    width): `k` and `v` (n_kv_heads, head_dim) for grouped-query attention, `latent` for
    multi-head latent attention. With sliding-window layers kept in rings, `full_layers`
    are in those and `ring_layers` in `{name}_ring` buffers of `ring` positions."""

    def __init__(
        self,
        config: ModelConfig,
        rows: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        window_slack: int = 256,
    ) -> None:
        super().__init__()
        if window_slack < 1:
            raise ValueError(f"window_slack: must be >= 1, got {window_slack}")
        if rows < 1:
            raise ValueError(f"rows: must be >= 1, got {rows}")
        if not 1 <= max_len <= config.max_seq_len:
            raise ValueError(f"max_len: must be in [1, {config.max_seq_len}], got {max_len}")
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype if dtype is not None else default_dtype(device)
        self.names = tuple(cache_layout(config))
        # Sliding-window layers keep the last `ring` entries of a row in a ring buffer
        # (entry i in slot i % ring; `ring_length`); the others keep every entry.
        ring = ring_length(config, max_len, window_slack)
        self.ring = max_len if ring is None else ring
        self.ring_layers: tuple[int, ...] = () if ring is None else config.sliding_layers
        self.full_layers = tuple(i for i in range(config.n_layers) if i not in self.ring_layers)
        # layer -> (in a ring, its index among the layers of its kind)
        self._where = {layer: (False, i) for i, layer in enumerate(self.full_layers)}
        self._where.update({layer: (True, i) for i, layer in enumerate(self.ring_layers)})
        for name, (heads, width) in cache_layout(config).items():
            shape = (len(self.full_layers), rows, heads, max_len, width)
            self.register_buffer(name, torch.zeros(shape, device=device, dtype=dtype))
            held = None
            if self.ring_layers:
                shape = (len(self.ring_layers), rows, heads, self.ring, width)
                held = torch.zeros(shape, device=device, dtype=dtype)
            self.register_buffer(f"{name}_ring", held)
        # The entry index each ring slot holds (-1: none), so a read knows what is there.
        owners = None
        if self.ring_layers:
            owners = torch.full((rows, self.ring), -1, device=device, dtype=torch.long)
        self.register_buffer("ring_owners", owners)
        # Each entry's token position, for sliding-window masks (`record_positions`): after
        # a tree's path is committed, or a drafter commits tree levels, an entry's index in
        # its row is not its token's position. Shaped as one more buffer so that keep and
        # copy_row move it with the others.
        positions = None
        if config.sliding_layers:
            positions = torch.zeros((1, rows, 1, max_len, 1), device=device, dtype=torch.long)
        self.register_buffer("token_positions", positions)
        self.max_len = max_len
        self.lengths: list[int] = [0] * rows
        self.pending: list[int] = [0] * rows  # entries written by the last forward, per row

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The full-length buffers, in `cache_layout` order (every layer's unless some
        keep a ring, `rings`)."""
        return tuple(getattr(self, name) for name in self.names)

    @property
    def rings(self) -> tuple[torch.Tensor, ...]:
        """The sliding-window layers' ring buffers, in `cache_layout` order (or none)."""
        return tuple(getattr(self, f"{name}_ring") for name in self.names if self.ring_layers)

    @property
    def _moved(self) -> tuple[torch.Tensor, ...]:
        """What keep and copy_row move by entry index: the full-length buffers and the
        entries' token positions."""
        extra = () if self.token_positions is None else (self.token_positions,)
        return self.tensors + extra

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def nbytes(self) -> int:
        """Bytes the key/value buffers hold, allocated up front."""
        return sum(buf.nbytes for buf in self.tensors + self.rings)

    def rollback(self, row: int, length: int) -> None:
        """Forget everything after the first `length` committed entries of `row`."""
        self._check_row(row)
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"length: must be in [0, {self.lengths[row]}], got {length}")
        self.lengths[row] = length
        self.pending[row] = 0

    def reset(self, row: int) -> None:
        """Make `row` empty, ready for a new sequence."""
        self.rollback(row, 0)

    def commit(self, row: int, offsets: Sequence[int]) -> None:
        """Keep the pending entries at `offsets` (in that order) and drop the other ones.

        offsets index the T tokens of the last forward on this row, e.g. the accepted
        root-to-node path of a token tree. The kept entries move to lengths[row] + 0, 1, ...
        (a gather then a scatter, so overlapping moves are safe); nothing is recomputed.
        """
        self._check_row(row)
        offsets = list(offsets)
        bad = [o for o in offsets if not 0 <= o < self.pending[row]]
        if bad:
            raise ValueError(
                f"offsets: must be in [0, {self.pending[row]}) (pending entries of row {row}), "
                f"got {bad[0]}"
            )
        start = self.lengths[row]
        self.lengths[row] += self.pending[row]
        self.keep(row, start, [start + o for o in offsets])

    def keep(self, row: int, start: int, positions: Sequence[int]) -> None:
        """Keep the committed entries at `positions` (each >= start), in that order, at
        start, start + 1, ...; drop everything else after `start`.

        A drafter that commits its tree into the cache uses this to keep the accepted
        path once the verifier answers. Example: lengths 8, keep(row, 5, [6, 7]) moves
        entries 6, 7 to 5, 6; lengths becomes 7.
        """
        self._check_row(row)
        positions = list(positions)
        bad = [p for p in positions if not start <= p < self.lengths[row]]
        if bad or not 0 <= start <= self.lengths[row]:
            raise ValueError(
                f"positions: must be in [start, {self.lengths[row]}) with start >= 0, "
                f"got start {start}, positions {positions}"
            )
        if positions != list(range(start, start + len(positions))):
            src = host_to_device(positions, self.device)
            dst = torch.arange(start, start + len(positions), device=self.device)
            for buf in self._moved:
                view = buf[:, row]  # (n_layers, heads, max_len, width)
                view.index_copy_(2, dst, view.index_select(2, src))
            self._ring_copy(row, row, positions, start)
        self.lengths[row] = start + len(positions)
        self.pending[row] = 0

    def copy_row(self, src: int, dst: int, positions: Sequence[int]) -> None:
        """Make row `dst` hold the committed entries of row `src` at `positions`, in order.

        Lets a caller try a continuation in a spare row without touching the original
        one (the edge drafts the next round there while the current one is verified).
        Example: copy_row(0, 1, [0, 1, 2, 5]) gives row 1 four entries: 0, 1, 2 and 5.
        """
        self._check_row(src)
        self._check_row(dst)
        positions = list(positions)
        if any(not 0 <= p < self.lengths[src] for p in positions):
            raise ValueError(f"positions: must be in [0, {self.lengths[src]}), got {positions}")
        index = host_to_device(positions, self.device)
        for buf in self._moved:
            buf[:, dst, :, : len(positions)] = buf[:, src].index_select(2, index)
        self._ring_copy(src, dst, positions, 0)
        self.lengths[dst] = len(positions)
        self.pending[dst] = 0

    def prepare(self, rows: Sequence[int], time: int) -> CacheStep:
        """Plan a forward of `time` new tokens on each of `rows` (one per batch row)."""
        rows = list(rows)
        for row in rows:
            self._check_row(row)
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows: must be distinct, got {rows}")
        starts = [self.lengths[row] for row in rows]
        if max(starts) + time > self.max_len:
            raise ValueError(
                f"time: {time} new tokens after {max(starts)} cached ones exceed "
                f"max_len={self.max_len}"
            )
        for row in rows:
            self.pending[row] = time
        device = self.device
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        starts_t = host_to_device(starts, device)
        shared = consecutive and len(set(starts)) == 1
        rows_t = host_to_device(rows, device)
        write_positions = starts_t[:, None] + torch.arange(time, device=device)
        return CacheStep(
            rows=rows_t,
            row_slice=slice(rows[0], rows[0] + len(rows)) if consecutive else None,
            starts=starts_t,
            write_positions=write_positions,
            kv_len=max(starts) + time,
            write_slice=slice(starts[0], starts[0] + time) if shared else None,
            window=self._window_step(rows_t, starts, write_positions) if self.ring_layers else None,
        )

    def _window_step(
        self, rows: torch.Tensor, starts: list[int], write_positions: torch.Tensor
    ) -> WindowStep:
        """Plan the rings' reads and writes, and record which entries the slots will hold."""
        ring, owners = self.ring, self.ring_owners
        assert owners is not None
        tail = min(ring, max(starts))
        first = host_to_device(starts, self.device)[:, None] - tail
        tail_entries = first + torch.arange(tail, device=self.device)  # (batch, tail)
        tail_slots = tail_entries % ring
        held = owners[rows[:, None], tail_slots] == tail_entries  # before this pass writes
        time = write_positions.shape[1]
        write_from = max(0, time - ring)
        write_slots = write_positions[:, write_from:] % ring
        owners[rows[:, None], write_slots] = write_positions[:, write_from:]
        new = torch.ones_like(write_positions, dtype=torch.bool)
        return WindowStep(
            columns=torch.cat([tail_entries.clamp_min(-1), write_positions], 1),
            valid=torch.cat([held & (tail_entries >= 0), new], 1),
            tail_slots=tail_slots,
            write_slots=write_slots,
            write_from=write_from,
        )

    def _ring_copy(self, src: int, dst: int, positions: Sequence[int], start: int) -> None:
        """Make entries start, start + 1, ... of row `dst`'s rings those at `positions` of
        row `src`'s. Only the last `ring` of them fit, and an entry `src`'s ring no longer
        holds is marked missing: a later pass whose window needs it fails (`ring_mask`)."""
        if not self.ring_layers:
            return
        assert self.ring_owners is not None
        first = max(0, len(positions) - self.ring)
        source = host_to_device(list(positions)[first:], self.device)
        target = torch.arange(start + first, start + len(positions), device=self.device)
        held = self.ring_owners[src, source % self.ring] == source
        for buf in self.rings:
            buf[:, dst, :, target % self.ring] = buf[:, src, :, source % self.ring]
        self.ring_owners[dst, target % self.ring] = torch.where(held, target, -1)

    def update(
        self, layer: int, step: CacheStep, *new_entries: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Write one new tensor per buffer, (batch, heads, time, width) in `cache_layout`
        order (k, v; or the latent), at step.write_positions.

        Returns each buffer's (batch, heads, step.kv_len, width) for the step's rows.
        Positions a row has not reached hold stale data; the attention mask hides them.
        """
        if len(new_entries) != len(self.names):
            raise ValueError(f"update: takes {self.names}, got {len(new_entries)} tensors")
        in_ring, layer = self._where[layer]
        if in_ring:
            return self._update_ring(layer, step, new_entries)
        out = []
        buffers = self._buffers  # once per layer per pass: no nn.Module attribute lookups
        index = None
        if step.write_slice is None:  # an indexed view: (batch, time, heads, width)
            index = (step.rows[:, None], slice(None), step.write_positions)
        for name, new in zip(self.names, new_entries, strict=True):
            buf = buffers[name][layer]
            if index is None:
                buf[step.row_slice, :, step.write_slice] = new
            else:
                buf[index] = new.transpose(1, 2)
            if step.row_slice is not None:
                out.append(buf[step.row_slice, :, : step.kv_len])
            else:
                out.append(buf[:, :, : step.kv_len].index_select(0, step.rows))
        return tuple(out)

    def _update_ring(
        self, layer: int, step: CacheStep, new_entries: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """A sliding-window layer's update: each buffer's (batch, heads, tail + time, width),
        its committed tail read from the ring then the new entries (`WindowStep`); the
        tail is read before the new entries are written over the oldest slots."""
        window = step.window
        assert window is not None
        out = []
        for buf, new in zip((t[layer] for t in self.rings), new_entries, strict=True):
            tail = buf[step.rows[:, None], :, window.tail_slots]  # (batch, tail, h, d)
            out.append(torch.cat([tail.transpose(1, 2), new], 2))
            kept = new[:, :, window.write_from :].transpose(1, 2)
            buf[step.rows[:, None], :, window.write_slots] = kept
        return tuple(out)

    def record_positions(self, step: CacheStep, positions: torch.Tensor) -> None:
        """Note the token positions (batch, time) of the entries `step` writes."""
        assert self.token_positions is not None, "the config has no sliding layers"
        self.token_positions[0, step.rows[:, None], 0, step.write_positions, 0] = positions

    def positions_of(self, step: CacheStep) -> torch.Tensor:
        """(batch, step.kv_len) token positions of the step's rows' entries (stale past a
        row's length: the mask hides those)."""
        assert self.token_positions is not None, "the config has no sliding layers"
        return self.token_positions[0, :, 0, : step.kv_len, 0].index_select(0, step.rows)

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.rows:
            raise ValueError(f"row: must be in [0, {self.rows}), got {row}")
