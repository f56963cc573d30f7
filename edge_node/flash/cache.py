"""One layer's neuron cache: preallocated bundle rows and the bookkeeping of who is where.

Rows 0..count-1 hold the resident neurons' bundles. Insertion appends; deletion moves
the last live rows into the freed slots; the tensors never change size ("LLM in a Flash",
section 3.3). The cache also keeps each neuron's last step of use, which windowing
(`end_step`) and eviction (`evict`) read.
"""

from __future__ import annotations

import torch


class NeuronCache:
    """One layer's preallocated bundle rows (capacity, payload) uint8, and who is where.

    Insertion appends at `count`; deletion fills each freed slot with one of the last
    rows, so rows 0..count-1 are always the resident ones and nothing is reallocated.

    Example: slots hold neurons [7, 3, 9, 5]; delete {3} -> [7, 5, 9] (neuron 5's row is
    copied into slot 1); insert [2, 4] -> [7, 5, 9, 2, 4].
    """

    def __init__(self, hidden: int, capacity: int, payload: int) -> None:
        self.rows = torch.zeros(capacity, payload, dtype=torch.uint8)
        self.neuron_at = torch.full((capacity,), -1, dtype=torch.long)
        self.slot_of = torch.full((hidden,), -1, dtype=torch.long)
        self.last_used = torch.full((hidden,), -1, dtype=torch.long)  # step of last use
        self.count = 0
        self.step = 0

    @property
    def capacity(self) -> int:
        return self.rows.shape[0]

    def resident(self) -> torch.Tensor:
        """Neuron ids in slot order, (count,)."""
        return self.neuron_at[: self.count]

    def insert(self, neurons: torch.Tensor) -> torch.Tensor:
        """Slots (len(neurons),) appended for `neurons` (not resident); rows to be filled."""
        n = len(neurons)
        if self.count + n > self.capacity:
            raise RuntimeError(f"neuron cache: {self.count} + {n} rows exceed {self.capacity}")
        slots = torch.arange(self.count, self.count + n)
        self.neuron_at[self.count : self.count + n] = neurons
        self.slot_of.index_copy_(0, neurons, slots)
        self.count += n
        return slots

    def delete(self, neurons: torch.Tensor) -> None:
        """Frees the slots of resident `neurons`, moving the last live rows into them."""
        if not len(neurons):
            return
        keep = self.count - len(neurons)
        dead = torch.zeros(self.count, dtype=torch.bool)
        dead.index_fill_(0, self.slot_of.index_select(0, neurons), True)
        holes = dead[:keep].nonzero().squeeze(1)
        movers = (~dead[keep:]).nonzero().squeeze(1) + keep
        # index_select / index_copy_ / index_fill_: the fast paths for whole rows.
        self.rows.index_copy_(0, holes, self.rows.index_select(0, movers))
        moved = self.neuron_at.index_select(0, movers)
        self.neuron_at.index_copy_(0, holes, moved)
        self.slot_of.index_copy_(0, moved, holes)
        self.slot_of.index_fill_(0, neurons, -1)
        self.neuron_at[keep : self.count] = -1
        self.count = keep

    def evict(self, n: int, chunk: torch.Tensor, needed: torch.Tensor) -> None:
        """Deletes n resident neurons outside `chunk` to make room for it.

        needed: every neuron of this step, ascending; `chunk` is the piece of it being
        loaded (all of it when the step fits the cache). Neurons this step does not need
        go first, least recently used first. Then Belady's rule, supposing the next step
        needs the same neurons: the neuron whose next use is farthest goes first. At
        needed-position p, with the chunk starting at position c, that is p - c steps
        away if p >= c, else len(needed) - c + p.

        Costs O(hidden) whatever the sizes: masks and ranks over all neurons, no sorting
        of the resident set (this runs on most tokens once the window fills the cache).
        """
        hidden = len(self.slot_of)
        resident = self.resident()
        in_chunk = torch.zeros(hidden, dtype=torch.bool).index_fill_(0, chunk, True)
        candidates = resident[~in_chunk.index_select(0, resident)]
        rank = torch.full((hidden,), -1, dtype=torch.long)
        rank.index_copy_(0, needed, torch.arange(len(needed)))
        position = rank.index_select(0, candidates)
        start = int(rank[chunk[0]]) if len(chunk) else 0
        distance = torch.where(position >= start, position - start, len(needed) - start + position)
        last_used = self.last_used.index_select(0, candidates)
        unwanted_key = self.step - last_used + 2 * len(needed) + 1
        key = torch.where(position >= 0, distance, unwanted_key)
        self.delete(candidates[torch.topk(key, n, sorted=False).indices])

    def end_step(self, window: int) -> None:
        """Deletes the neurons no step of the last `window` used; starts the next step."""
        resident = self.resident()
        self.delete(resident[self.last_used.index_select(0, resident) <= self.step - window])
        self.step += 1
