"""llama2.c checkpoints: stories260K.bin against two independent references.

1. A port of llama2.c's run.c forward (interleaved-pair RoPE on the raw, unpermuted
   weights), in float64: catches a wrong q/k permutation or a wrong tensor order.
2. transformers' LlamaForCausalLM on the same weights converted to HF layout by a
   converter written here with numpy (not lm.llama2c).
"""

import json
import math

import numpy as np
import pytest
import torch

from lm.checkpoint import load_model
from lm.kv_cache import KVCache

HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def read_bin(path) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """The .bin as llama2.c's run.c maps it: header dict and raw float32 arrays."""
    header = dict(zip(HEADER, np.fromfile(path, dtype="<i4", count=7).tolist(), strict=True))
    floats = np.fromfile(path, dtype="<f4", offset=28)
    dim, hidden, layers = header["dim"], header["hidden_dim"], header["n_layers"]
    head = dim // header["n_heads"]
    kv_dim, vocab = header["n_kv_heads"] * head, abs(header["vocab_size"])
    shapes = [
        ("token_embedding", (vocab, dim)),
        ("rms_att", (layers, dim)),
        ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, dim)),
        ("rms_ffn", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("rope_tables", (2, header["seq_len"], head // 2)),
    ]
    if header["vocab_size"] < 0:
        shapes.append(("wcls", (vocab, dim)))
    weights, offset = {}, 0
    for name, shape in shapes:
        weights[name] = floats[offset : offset + math.prod(shape)].reshape(shape)
        offset += math.prod(shape)
    assert offset == floats.size
    weights.setdefault("wcls", weights["token_embedding"])
    return header, weights


def runc_forward(header: dict[str, int], weights: dict[str, np.ndarray], tokens) -> torch.Tensor:
    """run.c's forward for one sequence, all positions at once, float64: (time, vocab)."""
    w = {
        name: torch.from_numpy(np.array(array, dtype=np.float64)) for name, array in weights.items()
    }
    n_heads, n_kv = header["n_heads"], header["n_kv_heads"]
    head = header["dim"] // n_heads
    time = len(tokens)
    pos = torch.arange(time, dtype=torch.float64)[:, None]
    freq = 1.0 / 10000.0 ** (torch.arange(0, head, 2, dtype=torch.float64) / head)
    cos, sin = torch.cos(pos * freq), torch.sin(pos * freq)  # (time, head / 2)

    def rmsnorm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * weight

    def rope(x, heads):  # rotate consecutive pairs (x[2i], x[2i+1]) of every head
        pairs = x.view(time, heads, head // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        c, s = cos[:, None], sin[:, None]
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).view(time, heads, head)

    x = w["token_embedding"][torch.tensor(tokens)]
    causal = torch.ones(time, time, dtype=torch.bool).tril()
    for layer in range(header["n_layers"]):
        xb = rmsnorm(x, w["rms_att"][layer])
        q = rope(xb @ w["wq"][layer].T, n_heads)
        k = rope(xb @ w["wk"][layer].T, n_kv)
        v = (xb @ w["wv"][layer].T).view(time, n_kv, head)
        out = torch.empty(time, n_heads, head, dtype=torch.float64)
        for h in range(n_heads):
            kv = h // (n_heads // n_kv)
            scores = (q[:, h] @ k[:, kv].T) / math.sqrt(head)
            att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out[:, h] = att @ v[:, kv]
        x = x + out.reshape(time, -1) @ w["wo"][layer].T
        xb = rmsnorm(x, w["rms_ffn"][layer])
        gate = xb @ w["w1"][layer].T
        x = x + (torch.nn.functional.silu(gate) * (xb @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w["wcls"].T


def hf_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """transformers' convert_llama_weights_to_hf permutation, from pairs to halves."""
    out, inp = weight.shape
    return weight.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def convert_to_hf(path, out_dir) -> None:
    """Write `path` as a transformers LlamaForCausalLM directory."""
    from safetensors.numpy import save_file

    header, w = read_bin(path)
    tensors = {
        "model.embed_tokens.weight": w["token_embedding"],
        "model.norm.weight": w["rms_final"],
    }
    for i in range(header["n_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = w["rms_att"][i]
        tensors[p + "self_attn.q_proj.weight"] = hf_permute(w["wq"][i], header["n_heads"])
        tensors[p + "self_attn.k_proj.weight"] = hf_permute(w["wk"][i], header["n_kv_heads"])
        tensors[p + "self_attn.v_proj.weight"] = w["wv"][i]
        tensors[p + "self_attn.o_proj.weight"] = w["wo"][i]
        tensors[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        tensors[p + "mlp.gate_proj.weight"] = w["w1"][i]
        tensors[p + "mlp.down_proj.weight"] = w["w2"][i]
        tensors[p + "mlp.up_proj.weight"] = w["w3"][i]
    if header["vocab_size"] < 0:
        tensors["lm_head.weight"] = w["wcls"]
    save_file(
        {k: np.ascontiguousarray(v) for k, v in tensors.items()}, out_dir / "model.safetensors"
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": abs(header["vocab_size"]),
        "hidden_size": header["dim"],
        "intermediate_size": header["hidden_dim"],
        "num_hidden_layers": header["n_layers"],
        "num_attention_heads": header["n_heads"],
        "num_key_value_heads": header["n_kv_heads"],
        "max_position_embeddings": header["seq_len"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": header["vocab_size"] > 0,
    }
    (out_dir / "config.json").write_text(json.dumps(config))


@torch.no_grad()
def greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation of `prompt`, decoded with a KV cache."""
    cache = KVCache(model.config, rows=1, max_len=len(prompt) + steps, device="cpu")
    tokens, new = list(prompt), list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([new]), cache=cache)
        cache.commit(0, range(len(new)))
        new = [int(logits[0, -1].argmax())]
        tokens += new
    return tokens


@pytest.fixture(scope="module")
def stories(stories260k):
    return load_model(stories260k, device="cpu", dtype=torch.float32)


def test_header_becomes_config(stories):
    c = stories.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads) == (64, 172, 5, 8, 4)
    assert (c.vocab_size, c.max_seq_len, c.tie_embeddings, c.norm_eps) == (512, 512, True, 1e-5)
    assert stories.output.weight is stories.tok_embeddings.weight


@torch.no_grad()
def test_stories260k_matches_runc_reference(stories260k, stories):
    tokens = greedy(stories, [1], 24) + [7, 300, 41, 2, 511]
    header, weights = read_bin(stories260k)
    expected = runc_forward(header, weights, tokens).float()
    got = stories(torch.tensor([tokens]))[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_stories260k_matches_transformers(stories260k, stories, tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM

    convert_to_hf(stories260k, tmp_path)
    ref = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = torch.tensor([greedy(stories, [1], 40)])
    expected = ref(tokens).logits
    torch.testing.assert_close(stories(tokens), expected, atol=1e-4, rtol=0)
    assert expected[0, :-1].argmax(-1).tolist() == tokens[0, 1:].tolist(), "greedy paths differ"


@torch.no_grad()
def test_stories260k_is_a_trained_model(stories):
    """Greedy text is confident (the README measures ~2.1 nats; uniform is ln 512 = 6.2)."""
    tokens = greedy(stories, [1], 60)
    probs = stories(torch.tensor([tokens]))[0].softmax(-1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    assert entropy < 3.0
    assert len(set(tokens[1:])) > 10


def write_bin(path, header: dict[str, int], rng: np.random.Generator) -> None:
    """A random llama2.c file with the given header (negative vocab_size = untied)."""
    dim, hidden, layers = header["dim"], header["hidden_dim"], header["n_layers"]
    head = dim // header["n_heads"]
    kv_dim, vocab = header["n_kv_heads"] * head, abs(header["vocab_size"])
    count = (
        vocab * dim
        + layers * (2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim)
        + dim
        + header["seq_len"] * head
        + (vocab * dim if header["vocab_size"] < 0 else 0)
    )
    values = rng.normal(0, 0.3, size=count).astype("<f4")
    with open(path, "wb") as f:
        f.write(np.array([header[k] for k in HEADER], dtype="<i4").tobytes())
        f.write(values.tobytes())


@torch.no_grad()
def test_untied_file_matches_runc_reference(tmp_path):
    path = tmp_path / "untied.bin"
    header = dict(
        dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-70, seq_len=16
    )
    write_bin(path, header, np.random.default_rng(0))
    model = load_model(path, device="cpu")
    assert not model.config.tie_embeddings and model.config.vocab_size == 70
    assert model.output.weight is not model.tok_embeddings.weight
    tokens = [1, 5, 69, 0, 33, 33, 8, 12]
    expected = runc_forward(*read_bin(path), tokens).float()
    torch.testing.assert_close(model(torch.tensor([tokens]))[0], expected, atol=1e-4, rtol=0)
