"""A recurrent draft head that reads the target's last hidden state (ReDrafter, Cheng et al.
2024, "Recurrent Drafter for Fast Speculative Decoding in Large Language Models",
arXiv 2403.09919).

Instead of a separate small language model, the draft is a tiny network on top of the target:
the target's final-norm hidden state h at the last accepted position carries the whole context,
and a recurrence over the draft tokens carries what was drafted since.

    s_0 = 0
    s_k = SiLU(W e(t_k) + U s_{k-1} + bias)          e: the target's token embedding (a copy)
    logits_k = lm_head(out(blocks([h ; s_k])))        blocks: residual SiLU blocks x + SiLU(A x + a)

t_1 is the bonus token b that the verifier appended after position p (the one whose hidden state
is h); logits_1 predicts the token after b, and t_k for k >= 2 are the head's own draft tokens
(teacher-forced during training).  The vocabulary projection is factored as out (to the target's
width) then lm_head, so lm_head can start as a copy of the target's output matrix.

Beam search over the head gives a few beams; like the SLM beam drafter
(edge_node/drafters/beam.py) they are packed into a token tree with shared prefixes stored once,
and the greedy chain (argmax at every step) is always kept as one beam.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lm.device import default_device, default_dtype
from lm.errors import CheckpointError
from lm.tree import TokenTree

CONFIG_FILE = "head_config.json"
WEIGHTS_FILE = "head.safetensors"


@dataclass(frozen=True)
class DraftHeadConfig:
    vocab_size: int  # the target's vocabulary
    hidden_size: int  # the target's width: its final-norm hidden state h is (hidden_size,)
    state_size: int  # width of the recurrent state s
    n_blocks: int = 2  # residual SiLU blocks over [h ; s], each (hidden_size + state_size)^2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "state_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if not isinstance(self.n_blocks, int) or self.n_blocks < 0:
            raise ValueError(f"n_blocks: must be an integer >= 0, got {self.n_blocks!r}")

    @property
    def input_size(self) -> int:
        """Width of [h ; s], the input of the residual blocks."""
        return self.hidden_size + self.state_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DraftHeadConfig:
        """Inverse of to_dict; unknown or missing keys raise ValueError naming them."""
        fields = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown field (allowed: {', '.join(sorted(fields))})")
        missing = sorted(f for f in fields - set(d) if f != "n_blocks")
        if missing:
            raise ValueError(f"{missing[0]}: missing")
        return cls(**d)


@dataclass(frozen=True)
class HeadDraft:
    """A beam-search draft: the token tree, the greedy chain's tree indices (root first), and
    width * depth, the node count before shared prefixes were merged."""

    tree: TokenTree
    main_path: tuple[int, ...]
    undeduplicated: int


class ResBlock(nn.Module):
    """x + SiLU(linear(x)); the linear starts at zero, so a fresh block is the identity."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(size, size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class DraftHead(nn.Module):
    def __init__(self, config: DraftHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.w = nn.Linear(config.hidden_size, config.state_size, bias=False)
        self.u = nn.Linear(config.state_size, config.state_size)  # its bias is the recurrence's
        self.blocks = nn.Sequential(*(ResBlock(config.input_size) for _ in range(config.n_blocks)))
        self.out = nn.Linear(config.input_size, config.hidden_size, bias=False)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def initial_state(self, batch: int) -> torch.Tensor:
        """s_0: (batch, state_size) zeros."""
        weight = self.u.weight
        return torch.zeros(batch, self.config.state_size, device=weight.device, dtype=weight.dtype)

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One recurrence step: state (B, S), tokens (B,) -> (B, S)."""
        return self._step(state, self.w(self.embedding(tokens)))

    def logits(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """hidden (..., hidden_size), state (..., S) -> logits (..., vocab) float32."""
        x = torch.cat([hidden.to(state.dtype), state], dim=-1)
        return self.lm_head(self.out(self.blocks(x))).float()

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: hidden (B, hidden_size), tokens (B, T) -> logits (B, T, vocab).

        tokens[:, 0] is the bonus token b; logits[:, k] predicts the token after tokens[:, k].
        """
        inputs = self.w(self.embedding(tokens))  # (B, T, S): W e(t) for every step at once
        state = self.initial_state(tokens.shape[0])
        states = []
        for k in range(tokens.shape[1]):
            state = self._step(state, inputs[:, k])
            states.append(state)
        states = torch.stack(states, dim=1)  # (B, T, S)
        return self.logits(hidden[:, None].expand(-1, tokens.shape[1], -1), states)

    def _step(self, state: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        return F.silu(projected + self.u(state))

    @torch.inference_mode()
    def beam_search(
        self, hidden: torch.Tensor, last_token: int, *, width: int, depth: int
    ) -> HeadDraft:
        """The `width` best continuations of `depth` tokens by summed log-probability, packed
        into a token tree; the greedy chain is always one of them.

        hidden: (hidden_size,) the target's hidden state at the last accepted position;
        last_token: the bonus token b that follows it.

        When the greedy continuation of the greedy beam is not among a level's `width` best
        candidates it replaces the worst of them, as in edge_node/drafters/beam.py.  Beams are
        packed with TokenTree.from_beams in score order.

        Example (width 2, depth 2): level 1 keeps tokens 5 (greedy) and 3; level 2's best two
        candidates are 5->7 (the greedy continuation of 5) and 5->2, so the beams are [5, 7] and
        [5, 2], the tree is tokens (5, 7, 2), parents (-1, 0, 0), and main_path is (0, 1).
        """
        if width < 1:
            raise ValueError(f"width: must be >= 1, got {width}")
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        device = self.u.weight.device
        hidden = hidden.to(device)[None]  # (1, hidden_size)
        state = self.advance(self.initial_state(1), torch.tensor([last_token], device=device))
        beams = torch.zeros(1, 0, dtype=torch.long, device=device)
        scores = torch.zeros(1, device=device)
        greedy = 0
        for level in range(depth):
            logprobs = F.log_softmax(self.logits(hidden.expand(len(beams), -1), state), dim=-1)
            rows, beams, scores, greedy = extend_beams(beams, scores, greedy, logprobs, width)
            if level < depth - 1:
                state = self.advance(state[rows], beams[:, -1])
        tree = TokenTree.from_beams(beams.tolist())
        main_path = _node_of(tree, beams[greedy].tolist())
        return HeadDraft(tree, tuple(main_path), len(beams) * depth)


def extend_beams(
    beams: torch.Tensor, scores: torch.Tensor, greedy: int, logprobs: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One level of beam search that keeps the greedy chain.

    beams: (rows, level) token ids; scores: (rows,) their summed log-probabilities; greedy: the
    row of the greedy chain; logprobs: (rows, vocab) next-token log-probabilities of each beam.
    Returns (parent rows (width,), beams (width, level + 1), scores (width,), greedy row): the
    `width` best extensions, except that when the greedy row's argmax extension is not among
    them it replaces the worst one.  Start from one empty beam: beams (1, 0), scores [0].

    Example: scores [-0.7, -0.8] (greedy row 0), best next tokens 7 (-1.4) after row 0 and
    4, 6 (-0.5, -1.0) after row 1, width 2: plain beam search keeps [.., 4] and [.., 6]; the
    greedy extension [.., 7] (-2.1) replaces [.., 6] and becomes greedy row 1.
    """
    vocab = logprobs.shape[-1]
    totals = (logprobs + scores[:, None]).flatten()
    best, flat = totals.topk(min(width, totals.numel()))
    greedy_flat = greedy * vocab + int(logprobs[greedy].argmax())
    hit = (flat == greedy_flat).nonzero()
    if len(hit):
        greedy = int(hit[0])
    else:
        flat[-1], best[-1] = greedy_flat, totals[greedy_flat]
        greedy = len(flat) - 1
    rows = flat // vocab
    return rows, torch.cat([beams[rows], (flat % vocab)[:, None]], dim=1), best, greedy


def _node_of(tree: TokenTree, beam: list[int]) -> list[int]:
    """Tree indices of `beam`'s nodes, root first (the beam must be in the tree)."""
    path, node = [], -1
    for token in beam:
        node = next(c for c in tree.children(node) if tree.tokens[c] == token)
        path.append(node)
    return path


def save_head(head: DraftHead, out_dir: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write OUT/head_config.json and OUT/head.safetensors (weights in `dtype`, default as is)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
        for name, t in head.state_dict().items()
    }
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(head.config.to_dict(), indent=2) + "\n")


def load_head(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DraftHead:
    """Load a head saved by save_head, in eval mode.

    device: default lm.device.default_device(); dtype: default default_dtype(device).
    Raises CheckpointError naming the file when a file is missing, corrupt or does not match.
    """
    path = Path(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for file in (config_path, weights_path):
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (a draft head directory needs it)")
    try:
        config = DraftHeadConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{config_path}: {exc}") from exc
    head = DraftHead(config)
    expected = head.state_dict()
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            names = set(f.keys())
            for name in sorted(set(expected) - names):
                raise CheckpointError(f"{weights_path}: missing tensor {name}")
            for name in sorted(names - set(expected)):
                raise CheckpointError(f"{weights_path}: unexpected tensor {name}")
            tensors = {name: f.get_tensor(name) for name in expected}
    except SafetensorError as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)}, "
                f"{config_path.name} implies {tuple(expected[name].shape)}"
            )
    head.load_state_dict(tensors)
    return head.to(device=device, dtype=dtype).eval()
