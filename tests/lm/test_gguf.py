"""GGUF loading: tiny files written here with llama.cpp's own writer (`gguf.GGUFWriter`),
and the real SmolLM2-135M-Instruct Q4_1 file compared with transformers' GGUF loading.

The tiny files are written the way llama.cpp's convert_hf_to_gguf.py writes a Llama:
GGUF tensor names, q/k rows permuted (`llama_cpp_permute`), 2-D weights quantized and
1-D norms kept F32, a tied classifier stored only as the embedding.
"""

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lm.checkpoint import load_model
from lm.errors import CheckpointError
from lm.llama2c import interleaved_to_halves
from lm.model import Transformer
from lm.tokenizer import Tokenizer
from lm.training.bpe import save_tokenizer, train_bpe
from lm.training.evaluate import generate

# --- tiny files written here -------------------------------------------------------------

# Ours (without "layers.{i}.") -> GGUF (without "blk.{i}."), as llama.cpp names them.
GGUF_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "attention.wq.bias": "attn_q.bias",
    "attention.wk.bias": "attn_k.bias",
    "attention.wv.bias": "attn_v.bias",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.gate.weight": "ffn_gate.weight",
    "feed_forward.up.weight": "ffn_up.weight",
    "feed_forward.down.weight": "ffn_down.weight",
}
GGUF_GLOBAL_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
# Max |logit difference| to the unquantized model over max |logit|, measured on these
# models (seeds 0, 3, 7; 2 x 16 tokens; max |logit| 2 untied, 40 tied): F32 0, F16 3.7e-4,
# Q8_0 8.3e-3, Q4_1 0.125. The bounds leave about 3x; the exact check is against the
# quantize -> dequantize round trip.
QUANT_BOUNDS = {Q.F32: 1e-6, Q.F16: 2e-3, Q.Q8_0: 2.5e-2, Q.Q4_1: 0.4}
MODELS = {
    "llama_untied": dict(vocab_size=301, rope_theta=5e5),
    "llama_tied_head_dim": dict(vocab_size=301, tie_embeddings=True, head_dim=16, n_kv_heads=1),
    "qwen2_bias": dict(
        vocab_size=301, architecture="Qwen2ForCausalLM", qkv_bias=True, tie_embeddings=True
    ),
}
TRAINING_LINES = ["héllo wörld 日本語 🙂", "the cat sat on the mat", "<think> hello </think>"] * 10
SAMPLE_TEXTS = [
    "héllo wörld 日本語 🙂",
    "a crab 🦀 sat on the mat",
    "<|bos|>the cat<|eos|> and <think>",
    "  two spaces\nnew line",
]
CHAT_TEMPLATE = "{% for m in messages %}<|bos|>{{ m['content'] }}<|eos|>{% endfor %}"


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: q/k rows from halves to interleaved."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(
    model: Transformer,
    path: Path,
    qtype: Q,
    tokenizer_dir: Path | None = None,
    encode: Callable[[np.ndarray], np.ndarray] | None = None,
):
    """Write `model` (and the tokenizer saved in `tokenizer_dir`) as llama.cpp would.

    encode: the `qtype` bytes stored for a 2-D tensor given its float array in the file's
        layout (q/k rows permuted); default gguf's own quantizer.
    """
    encode = encode or (lambda array: gguf.quants.quantize(array, qtype))
    config = model.config
    arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[config.architecture]
    writer = gguf.GGUFWriter(path, arch)
    metadata = {
        writer.add_block_count: config.n_layers,
        writer.add_context_length: config.max_seq_len,
        writer.add_embedding_length: config.dim,
        writer.add_feed_forward_length: config.hidden_dim,
        writer.add_head_count: config.n_heads,
        writer.add_head_count_kv: config.n_kv_heads,
        writer.add_key_length: config.head_dim,
        writer.add_value_length: config.head_dim,
        writer.add_rope_dimension_count: config.head_dim,
        writer.add_rope_freq_base: config.rope_theta,
        writer.add_layer_norm_rms_eps: config.norm_eps,
        writer.add_vocab_size: config.vocab_size,
        writer.add_bos_token_id: 0,
        writer.add_eos_token_id: 1,
    }
    for add, value in metadata.items():
        add(value)
    if tokenizer_dir is not None:
        add_tokenizer(writer, tokenizer_dir)
    for ours, tensor in model.state_dict().items():
        if ours == "output.weight" and config.tie_embeddings:
            continue
        if ours.startswith("layers."):
            _, layer, rest = ours.split(".", 2)
            name = f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}"
        else:
            name = GGUF_GLOBAL_NAMES[ours]
        array = tensor.detach().float().numpy()
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.n_heads if "attn_q" in name else config.n_kv_heads
            array = llama_cpp_permute(array, heads)
        if array.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(name, encode(array), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path) -> None:
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"] | {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"]: t["special"] for t in spec["added_tokens"]}
    types = [
        gguf.TokenType.NORMAL
        if token not in special
        else gguf.TokenType.CONTROL
        if special[token]
        else gguf.TokenType.USER_DEFINED
        for token in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_chat_template(CHAT_TEMPLATE)


def round_tripped(model: Transformer, qtype: Q) -> Transformer:
    """`model` with every 2-D weight quantized to `qtype` and back: what a loader of the
    quantized file must reproduce exactly."""
    state = model.state_dict()
    if qtype != Q.F32:
        for name, tensor in state.items():
            if tensor.dim() == 2:
                restored = gguf.quants.dequantize(
                    gguf.quants.quantize(tensor.numpy(), qtype), qtype
                )
                state[name] = torch.from_numpy(restored)
    copy = Transformer(model.config)
    copy.load_state_dict(state)
    return copy.eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE (300 ids) plus a non-special added token, <think> (id 300)."""
    tokenizer = train_bpe(TRAINING_LINES, vocab_size=300)
    tokenizer.add_tokens(["<think>"])
    directory = tmp_path_factory.mktemp("bpe")
    save_tokenizer(tokenizer, directory, max_length=64)
    return directory


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_gguf_logits(name, qtype, make_transformer, tmp_path) -> None:
    model = make_transformer(seed=3, **MODELS[name])
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path, qtype)
    loaded = load_model(path, device="cpu", dtype=torch.float32)
    # The file stores eps as float32, and the writer gave the tokenizer's bos/eos ids.
    eps = float(np.float32(model.config.norm_eps))
    assert loaded.config == replace(model.config, norm_eps=eps, bos_token_id=0, eos_token_id=1)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        got = loaded(ids)
        # Exact but for float rounding: the same weights as quantize -> dequantize.
        torch.testing.assert_close(got, round_tripped(model, qtype)(ids), atol=1e-5, rtol=0)
        original = model(ids)
        assert (got - original).abs().max() <= QUANT_BOUNDS[qtype] * original.abs().max()


def test_tiny_gguf_loads_as_bfloat16(make_transformer, tmp_path) -> None:
    model = make_transformer(seed=1, **MODELS["llama_untied"])
    write_gguf(model, tmp_path / "tiny.gguf", Q.Q8_0)
    loaded = load_model(tmp_path / "tiny.gguf", device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_tokenizer_round_trip(tokenizer_dir, make_transformer, tmp_path) -> None:
    path = tmp_path / "with_tokenizer.gguf"
    write_gguf(make_transformer(**MODELS["llama_untied"]), path, Q.F32, tokenizer_dir)
    original, from_gguf = Tokenizer.from_dir(tokenizer_dir), Tokenizer.from_dir(path)
    assert from_gguf.vocab_size == original.vocab_size == 301
    assert (from_gguf.bos_id, from_gguf.eos_id) == (0, 1)
    assert from_gguf.chat_template == CHAT_TEMPLATE
    for text in SAMPLE_TEXTS:
        ids = from_gguf.encode(text)
        assert ids == original.encode(text)
        assert from_gguf.decode(ids, skip_special_tokens=False) == text
    assert from_gguf.encode("<think>")[0] == 300  # matched whole, not cut into bytes
    assert from_gguf.decode(from_gguf.encode("<|bos|>hi")) == "hi"  # special: skipped
    # An edge given the file gets its tokenizer too (text prompts work there).
    from edge_node.models import load_edge_models

    edge = load_edge_models(path, device="cpu")
    assert edge.tokenizer.encode(SAMPLE_TEXTS[0]) == original.encode(SAMPLE_TEXTS[0])


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.02, 0.5, 0.99])
def test_truncated_file(keep, make_transformer, tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(make_transformer(**MODELS["llama_untied"]), path, Q.Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(CheckpointError, match="tiny.gguf: not a readable GGUF file"):
        load_model(path, device="cpu")


def test_unsupported_architecture(make_transformer, tmp_path) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(make_transformer(**MODELS["llama_untied"]), path, Q.F32)
    data = path.read_bytes().replace(b"llama", b"gemma")  # the arch value and its key prefix
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="general.architecture 'gemma' is not supported"):
        load_model(path, device="cpu")


# --- the real SmolLM2-135M-Instruct Q4_1 --------------------------------------------------

# Max |logit difference| to transformers (float32, eager attention) measured on the
# 45-token chat prompt below: 6.0e-5, on logits up to ~38.
REAL_LOGITS_ATOL = 5e-4
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word, café 🙂."}]


@pytest.fixture(scope="session")
def real_pair(real_gguf: Path):
    """(ours, transformers') models and tokenizers of the real file, float32 CPU."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    theirs = AutoModelForCausalLM.from_pretrained(
        real_gguf.parent, gguf_file=real_gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    their_tokenizer = AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    ours = load_model(real_gguf, device="cpu", dtype=torch.float32)
    return ours, Tokenizer.from_dir(real_gguf), theirs, their_tokenizer


@pytest.mark.real_model
@pytest.mark.slow
def test_real_tokenizer_matches_transformers(real_pair) -> None:
    _, tokenizer, _, theirs = real_pair
    text = theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert tokenizer.chat_template == theirs.chat_template
    assert text.startswith("<|im_start|>system\n")
    for sample in (text, *SAMPLE_TEXTS):
        assert tokenizer.encode(sample) == theirs(sample)["input_ids"]
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)  # <|im_start|>, <|im_end|>


@pytest.mark.real_model
@pytest.mark.slow
def test_real_logits_and_greedy_match_transformers(real_pair) -> None:
    ours, tokenizer, theirs, their_tokenizer = real_pair
    text = their_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=REAL_LOGITS_ATOL, rtol=0)
        expected = theirs.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
    generated = generate(ours, ids, 20)[0]  # greedy, with our KV cache
    # transformers stops early at <|im_end|>; up to there the tokens must agree.
    assert generated.tolist()[: len(expected)] == expected.tolist()


# --- K-quants: gguf's writer cannot quantize to them, so the blocks are made here -------

# Bytes per 256-value block, where its float16 scales sit, and its int8 sub-scales if any
# (llama.cpp's block_q4_K: d, dmin, 12 bytes of 6-bit scales, 128 of nibbles; block_q6_K:
# 128 + 64 bytes of quants, 16 int8 scales, then d).
K_BLOCKS = {Q.Q4_K: (144, (0, 2), None), Q.Q6_K: (210, (208,), slice(192, 208))}


def random_kquant(rows: int, cols: int, qtype: Q, gen: np.random.Generator) -> np.ndarray:
    """(rows, cols / 256 * block bytes) uint8 of valid `qtype` blocks: random quants and
    sub-scales, small float16 super-scales. Q6_K's int8 sub-scales are kept in [16, 48),
    like a trained model's, not anywhere in [-128, 128), which would leave a third of the
    weights near zero beside the rest."""
    size, scale_offsets, sub_scales = K_BLOCKS[qtype]
    blocks = gen.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    if sub_scales is not None:
        blocks[..., sub_scales] = gen.integers(16, 48, blocks[..., sub_scales].shape)
    for offset in scale_offsets:
        scales = gen.uniform(1e-3, 4e-3, (rows, cols // 256)).astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(rows, -1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_kquant_gguf_loads_the_files_weights(qtype, make_transformer, tmp_path) -> None:
    """Every 2-D tensor stored as K-quant blocks (256 values each, as in the Q4_K_M files
    llama.cpp publishes): the loaded model computes with exactly the dequantized blocks
    (q/k rows un-permuted), and int4/int8 requantize them close to that."""
    from lm.quantized import Int4Linear, Int8Linear, QuantScheme, load_quantized

    model = make_transformer(
        seed=4, dim=256, hidden_dim=256, n_heads=4, n_kv_heads=2, vocab_size=97, n_layers=1
    )
    gen = np.random.default_rng(0)
    stored = []  # each 2-D tensor's dequantized blocks, in the file's layout and order

    def encode(array: np.ndarray) -> np.ndarray:
        blocks = random_kquant(*array.shape, qtype, gen)
        stored.append(torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy()))
        return blocks

    write_gguf(model, tmp_path / "k.gguf", qtype, encode=encode)
    config = model.config
    state = model.state_dict()
    matrices = [name for name, tensor in state.items() if tensor.dim() == 2]
    for ours, weight in zip(matrices, stored, strict=True):
        if ours.endswith(("wq.weight", "wk.weight")):  # the file holds llama.cpp's rows
            heads = config.n_heads if "wq" in ours else config.n_kv_heads
            weight = interleaved_to_halves(weight, heads)  # (inverse of llama_cpp_permute)
        state[ours] = weight
    reference = Transformer(config)
    reference.load_state_dict(state)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(0))
    loaded = load_model(tmp_path / "k.gguf", device="cpu", dtype=torch.float32)
    with torch.no_grad():
        expected = reference.eval()(ids)
        torch.testing.assert_close(loaded(ids), expected, atol=1e-5, rtol=0)
    # Requantized layers against the file's weights (the model is random, so its logits
    # amplify any change; the layers are what requantizing decides).
    weight = state["layers.0.feed_forward.down.weight"]
    errors = {}
    for scheme in ("int4", "int8"):
        down = load_quantized(tmp_path / "k.gguf", QuantScheme.named(scheme))
        down = down.layers[0].feed_forward.down
        assert isinstance(down, Int4Linear if scheme == "int4" else Int8Linear)
        errors[scheme] = ((down.weight().float() - weight).abs().max() / weight.abs().max()).item()
    print(f"{qtype.name}: {errors}")
    # Measured (max |weight error| / max |weight|): int8 0.006 from both; int4 0.030 from
    # Q4_K (its 32-value sub-blocks are 16-level grids, so groups of 32 refit them up to
    # bfloat16 scales and zeros) and 0.064 from Q6_K (64 levels do not fit 16).
    assert errors["int8"] < 0.02
    assert errors["int4"] < (0.06 if qtype == Q.Q4_K else 0.15)
