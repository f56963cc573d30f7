"""The shape of a model, and its mapping to and from Hugging Face config.json.

One frozen dataclass describes every model the core runs: Llama, Qwen2 (Llama plus a
bias on the q/k/v projections), Mistral (Llama plus a sliding attention window, which
we do not implement: see `ModelConfig.from_hf`) and DeepSeek-V3's multi-head latent
attention with dense MLPs (the `kv_lora_rank` fields; mixture-of-experts layers are not
implemented).

The seams for another architecture are fields, each resolved once by a registry in
`lm.model`: `architecture` picks the attention layer and its cache (`ARCHITECTURES`),
`norm` the normalisation (`NORMS`), `activation` the MLP's (`ACTIVATIONS`), and `head_dim`
is given, not derived, when a checkpoint's heads are not dim // n_heads wide.
"""

import logging
from dataclasses import dataclass
from typing import Any, Literal, get_args

logger = logging.getLogger(__name__)

Activation = Literal["silu", "relu", "gelu_tanh"]
# rmsnorm: Llama's, weight * normed cast back; gemma_rmsnorm: Gemma's, normed * (1 + weight)
# in float32, then cast back.
Norm = Literal["rmsnorm", "gemma_rmsnorm"]
Architecture = Literal[
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "DeepseekV3ForCausalLM",
    "Gemma3ForCausalLM",
]

# Our activation name -> Hugging Face's `hidden_act` spelling (Gemma's MLP is gelu_tanh).
_HF_ACTIVATIONS: dict[str, str] = {"silu": "silu", "relu": "relu", "gelu_tanh": "gelu_pytorch_tanh"}
_ACTIVATIONS_FROM_HF = {hf: ours for ours, hf in _HF_ACTIVATIONS.items()}

_MODEL_TYPES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Gemma3ForCausalLM": "gemma3_text",
}
_MLA = "DeepseekV3ForCausalLM"
_GEMMA3 = "Gemma3ForCausalLM"
# Gemma 3's defaults where a config does not say (HF's and llama.cpp's alike): every
# sixth layer global, the others local with RoPE base 10000.
GEMMA3_GLOBAL_EVERY = 6
GEMMA3_LOCAL_THETA = 10_000.0


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a decoder-only Llama-family transformer.

    Weight shapes follow from these fields: embeddings (vocab_size, dim); per layer
    wq (n_heads * head_dim, dim), wk/wv (n_kv_heads * head_dim, dim), wo (dim, n_heads *
    head_dim), and the gated MLP gate/up (hidden_dim, dim), down (dim, hidden_dim).
    """

    vocab_size: int  # rows of the token embedding (and of the classifier)
    dim: int  # width of the residual stream ("hidden_size" in HF)
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (grouped-query attention when < n_heads)
    hidden_dim: int  # MLP width ("intermediate_size" in HF)
    # Width of one q/k/v head (even: RoPE rotates halves). None: dim // n_heads, filled in
    # by __post_init__, so dataclasses.replace of dim or n_heads must pass it again.
    head_dim: int | None = None
    max_seq_len: int = 2048  # longest context the model is valid for; caches may not exceed it
    norm: Norm = "rmsnorm"  # before attention, before the MLP and before the classifier
    norm_eps: float = 1e-5  # the norm's epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    tie_embeddings: bool = False  # classifier shares the token embedding matrix
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2 only)
    activation: Activation = "silu"  # MLP is always gated: down(act(gate(x)) * up(x))
    # The HF class these weights load into; picks the attention layer and its cache.
    architecture: Architecture = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Multi-head latent attention: set for "DeepseekV3ForCausalLM" only (see above).
    kv_lora_rank: int | None = None  # width of the cached latent
    q_lora_rank: int | None = None  # queries through a low-rank bottleneck; None: directly
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    # Sliding-window attention (Gemma 3): on these layers a query at position p sees keys
    # at positions p - sliding_window + 1 .. p, and RoPE uses rope_local_theta.
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    rope_local_theta: float | None = None
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5).
    query_pre_attn_scalar: int | None = None

    @property
    def gemma3(self) -> bool:
        """Gemma 3's block: scaled embeddings, QK-norm, norms before and after each half."""
        return self.architecture == _GEMMA3

    @property
    def mla(self) -> bool:
        """Whether attention is multi-head latent attention."""
        return self.architecture == _MLA

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim"):
            _require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        _require(self.max_seq_len >= 1, "max_seq_len", "must be >= 1", self.max_seq_len)
        if self.head_dim is None:
            _require(self.dim % self.n_heads == 0, "dim", "must be a multiple of n_heads", self.dim)
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        _require(
            self.head_dim >= 2 and self.head_dim % 2 == 0,
            "head_dim",
            "must be even and >= 2 (RoPE)",
            self.head_dim,
        )
        _require(
            self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"must divide n_heads={self.n_heads}",
            self.n_kv_heads,
        )
        _require(self.norm_eps > 0, "norm_eps", "must be > 0", self.norm_eps)
        _require(self.rope_theta > 0, "rope_theta", "must be > 0", self.rope_theta)
        for name, allowed in (("norm", Norm), ("activation", Activation)):
            value = getattr(self, name)
            _require(value in get_args(allowed), name, f"must be one of {get_args(allowed)}", value)
        _require(
            self.architecture in _MODEL_TYPES,
            "architecture",
            f"must be one of {tuple(_MODEL_TYPES)}",
            self.architecture,
        )
        # Qwen2 always has q/k/v bias and the others never do; anything else has no HF class.
        wants_bias = self.architecture == "Qwen2ForCausalLM"
        _require(
            self.qkv_bias == wants_bias,
            "qkv_bias",
            f"must be {wants_bias} for {self.architecture}",
            self.qkv_bias,
        )
        if self.mla:  # no KV heads of its own; HF's eager attention divides by them
            _require(
                self.n_kv_heads == self.n_heads,
                "n_kv_heads",
                f"must equal n_heads={self.n_heads} for {_MLA}",
                self.n_kv_heads,
            )
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if self.mla:
                _require(value is not None and value >= 1, name, f"must be >= 1 for {_MLA}", value)
            else:
                _require(value is None, name, f"is for {_MLA} only", value)
        object.__setattr__(self, "sliding_layers", tuple(self.sliding_layers))
        if self.sliding_layers:
            _require(
                self.sliding_window is not None and self.sliding_window >= 1,
                "sliding_window",
                "must be >= 1 when sliding_layers are given",
                self.sliding_window,
            )
            _require(
                all(0 <= i < self.n_layers for i in self.sliding_layers),
                "sliding_layers",
                f"must be layer indices in [0, {self.n_layers})",
                self.sliding_layers,
            )
        else:
            _require(
                self.sliding_window is None,
                "sliding_window",
                "needs sliding_layers",
                self.sliding_window,
            )
        _require(
            self.rope_local_theta is None or self.rope_local_theta > 0,
            "rope_local_theta",
            "must be > 0",
            self.rope_local_theta,
        )
        wants_norm = "gemma_rmsnorm" if self.gemma3 else "rmsnorm"
        _require(
            self.norm == wants_norm,
            "norm",
            f"must be {wants_norm} for {self.architecture}",
            self.norm,
        )
        if self.q_lora_rank is not None:
            _require(self.mla, "q_lora_rank", f"is for {_MLA} only", self.q_lora_rank)
            _require(self.q_lora_rank >= 1, "q_lora_rank", "must be >= 1", self.q_lora_rank)

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> "ModelConfig":
        """Read a Hugging Face config.json dict.

        Accepts both the transformers 4 spelling (top-level ``rope_theta``, ``rope_scaling``)
        and the transformers 5 one (``rope_parameters``). Raises ValueError, naming the key,
        for anything this core would run differently from transformers: RoPE scaling, Llama
        attention/MLP biases, a ``hidden_act`` other than silu, relu and gelu_pytorch_tanh.
        ``head_dim`` is read as transformers 5 reads it: dim // n_heads when absent.

        Sliding-window attention (Mistral; Qwen2 with use_sliding_window) is not implemented.
        Attention is identical to full attention while the context is no longer than the
        window, so max_seq_len is clamped to the window, and KV caches cannot grow past it.
        """
        archs = hf_config.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in _MODEL_TYPES:
            raise ValueError(
                f"architectures: unsupported architecture {arch!r}; "
                f"supported: {', '.join(_MODEL_TYPES)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if key not in hf_config:
                raise ValueError(f"{key}: missing from config")
        if "num_attention_heads" not in hf_config:
            raise ValueError("num_attention_heads: missing from config")
        rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_parameters: rope_type {rope_type!r} is not supported")
        rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
        n_heads = hf_config["num_attention_heads"]
        if arch == "LlamaForCausalLM":
            for key in ("attention_bias", "mlp_bias"):
                if hf_config.get(key):
                    raise ValueError(f"{key}: Llama projection biases are not supported")
        mla = _mla_fields(hf_config) if arch == _MLA else {}
        gemma = _gemma3_fields(hf_config) if arch == _GEMMA3 else {}
        if gemma:
            rope_theta = gemma.pop("rope_theta")
        # unknown: ModelConfig names it; Gemma spells it hidden_activation
        hidden_act = hf_config.get("hidden_act") or hf_config.get("hidden_activation", "silu")
        max_seq_len = hf_config.get("max_position_embeddings", 2048)
        window = None if gemma else _sliding_window(arch, hf_config)
        if window is not None and window < max_seq_len:
            logger.info("sliding_window=%d: limiting max_seq_len from %d", window, max_seq_len)
            max_seq_len = window
        eos = hf_config.get("eos_token_id")
        return cls(
            vocab_size=hf_config["vocab_size"],
            dim=hf_config["hidden_size"],
            n_layers=hf_config["num_hidden_layers"],
            n_heads=n_heads,
            # MLA has no key/value heads of its own: each query head reads the latent.
            n_kv_heads=n_heads if mla else hf_config.get("num_key_value_heads") or n_heads,
            hidden_dim=hf_config["intermediate_size"],
            head_dim=mla.pop("head_dim", hf_config.get("head_dim")),
            max_seq_len=max_seq_len,
            norm_eps=hf_config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM",
            activation=_ACTIVATIONS_FROM_HF.get(hidden_act, hidden_act),
            architecture=arch,
            bos_token_id=hf_config.get("bos_token_id"),
            # Llama 3 lists several end tokens; the first is the canonical one.
            eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
            **mla,
            **gemma,
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers (4.45+ and 5.x) loads into `architecture`."""
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": _MODEL_TYPES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": _HF_ACTIVATIONS[self.activation],
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.mla:
            hf.update(
                qk_rope_head_dim=self.head_dim,
                qk_nope_head_dim=self.qk_nope_head_dim,
                v_head_dim=self.v_head_dim,
                kv_lora_rank=self.kv_lora_rank,
                q_lora_rank=self.q_lora_rank,
                first_k_dense_replace=self.n_layers,  # every MLP dense
                rope_interleave=True,
                attention_bias=False,
            )
        elif self.gemma3:
            hf.update(
                hidden_activation=hf.pop("hidden_act"),
                sliding_window=self.sliding_window,
                layer_types=[
                    "sliding_attention" if i in self.sliding_layers else "full_attention"
                    for i in range(self.n_layers)
                ],
                rope_parameters={
                    "full_attention": {"rope_type": "default", "rope_theta": self.rope_theta},
                    "sliding_attention": {
                        "rope_type": "default",
                        "rope_theta": self.rope_local_theta or self.rope_theta,
                    },
                },
                # transformers 4's spelling of the local base (it reads rope_theta too)
                rope_local_base_freq=self.rope_local_theta or self.rope_theta,
                query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim,
                attention_bias=False,
                final_logit_softcapping=None,
                attn_logit_softcapping=None,
            )
        elif self.architecture == "LlamaForCausalLM":
            hf.update(attention_bias=False, mlp_bias=False)
        elif self.architecture == "MistralForCausalLM":
            hf["sliding_window"] = None  # we compute full attention; say so
        else:
            hf["use_sliding_window"] = False
        return hf


def _mla_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's multi-head latent attention fields from a DeepSeek-V3 config.json;
    ValueError, naming the key, for what this core does not run."""
    n_layers = hf_config["num_hidden_layers"]
    if hf_config.get("first_k_dense_replace", 3) < n_layers:
        raise ValueError(
            f"first_k_dense_replace: must be >= num_hidden_layers={n_layers} (mixture-of-"
            f"experts layers are not supported), got {hf_config.get('first_k_dense_replace', 3)}"
        )
    if not hf_config.get("rope_interleave", True):
        raise ValueError("rope_interleave: only DeepSeek's interleaved rotary layout is supported")
    if hf_config.get("attention_bias"):
        raise ValueError("attention_bias: MLA projection biases are not supported")
    for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
        if key not in hf_config:
            raise ValueError(f"{key}: missing from config")
    return dict(
        head_dim=hf_config["qk_rope_head_dim"],
        kv_lora_rank=hf_config["kv_lora_rank"],
        q_lora_rank=hf_config.get("q_lora_rank"),
        qk_nope_head_dim=hf_config["qk_nope_head_dim"],
        v_head_dim=hf_config["v_head_dim"],
    )


def _gemma3_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's Gemma 3 fields from a Gemma3ForCausalLM config.json (transformers 4's
    rope_theta / rope_local_base_freq / sliding_window_pattern spelling or transformers 5's
    rope_parameters per layer type / layer_types); ValueError naming the key otherwise."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf_config.get(key) is not None:
            raise ValueError(f"{key}: logit soft-capping is not supported")
    if hf_config.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention: only causal attention is supported")
    n_layers = hf_config["num_hidden_layers"]
    types = hf_config.get("layer_types")
    if types is None:
        pattern = hf_config.get(
            "sliding_window_pattern", hf_config.get("_sliding_window_pattern", GEMMA3_GLOBAL_EVERY)
        )
        types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(n_layers)
        ]
    rope = hf_config.get("rope_parameters") or {}
    thetas = {}
    for layer_type, legacy_key, default in (
        ("full_attention", "rope_theta", 1_000_000.0),
        ("sliding_attention", "rope_local_base_freq", GEMMA3_LOCAL_THETA),
    ):
        params = rope.get(layer_type) or {}
        scaling = hf_config.get("rope_scaling") if layer_type == "full_attention" else None
        kind = params.get("rope_type", (scaling or {}).get("rope_type", "default"))
        if kind != "default":
            raise ValueError(f"rope_parameters: rope_type {kind!r} is not supported")
        thetas[layer_type] = float(params.get("rope_theta", hf_config.get(legacy_key, default)))
    sliding = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    return dict(
        norm="gemma_rmsnorm",
        rope_theta=thetas["full_attention"],
        rope_local_theta=thetas["sliding_attention"],
        sliding_window=hf_config.get("sliding_window") if sliding else None,
        sliding_layers=sliding,
        query_pre_attn_scalar=int(hf_config.get("query_pre_attn_scalar", 256)),
    )


def _sliding_window(arch: str, hf_config: dict[str, Any]) -> int | None:
    if arch == "MistralForCausalLM":
        return hf_config.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and hf_config.get("use_sliding_window"):
        return hf_config.get("sliding_window")
    return None


def _require(ok: bool, field: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field}: {rule}, got {value!r}")
