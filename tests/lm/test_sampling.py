import pytest
import torch

from lm.sampling import SamplingParams, make_generator, probs_from_logits, sample
from tests.stats import chi_square_pvalue


def test_defaults_are_greedy_and_top_p_zero_means_off() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert SamplingParams(top_p=0.0).top_p == 1.0


def test_greedy_is_one_hot_on_first_argmax() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, -1.0, -5.0, 2.0]], dtype=torch.bfloat16)
    probs = probs_from_logits(logits, SamplingParams(top_k=1, top_p=0.1))
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.tensor([[0.0, 1, 0, 0], [0, 0, 0, 1]]))


def test_docstring_example_top_k_then_top_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.8))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_top_p_keeps_the_token_that_crosses_the_threshold_and_at_least_one() -> None:
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    crossing = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.65))
    torch.testing.assert_close(crossing, torch.tensor([0.0, 2 / 3, 1 / 3]))
    tiny = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=1e-9))
    torch.testing.assert_close(tiny, torch.tensor([0.0, 1.0, 0.0]))


def test_top_k_keeps_ties_at_the_kth_value() -> None:
    logits = torch.tensor([2.0, 1.0, 1.0, 0.0])
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [True, True, True, False]


def test_tiny_temperature_stays_finite_and_peaks_on_argmax() -> None:
    logits = torch.tensor([1.0, 2.0, 30.0, 29.0])
    probs = probs_from_logits(logits, SamplingParams(temperature=1e-30))
    assert torch.equal(probs, torch.tensor([0.0, 0.0, 1.0, 0.0]))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=0.9, top_p=0.8),
        SamplingParams(temperature=0.6, top_k=12, top_p=0.9),
        SamplingParams(temperature=2.0, top_k=1),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_transformers_logits_warpers(params: SamplingParams, dtype: torch.dtype) -> None:
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    warpers = [transformers.TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(transformers.TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(transformers.TopPLogitsWarper(params.top_p))
    flat = logits.float().reshape(-1, 40)
    for warper in warpers:
        flat = warper(None, flat)
    expected = torch.softmax(flat, dim=-1).reshape(2, 3, 40)
    actual = probs_from_logits(logits, params)
    assert actual.shape == (2, 3, 40) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected)


def test_sample_follows_the_distribution_and_never_draws_zero_probability() -> None:
    probs = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05])
    rows = 40_000
    tokens = sample(probs.expand(rows, 5), make_generator(1234))
    assert tokens.shape == (rows,) and tokens.dtype == torch.long
    counts = torch.bincount(tokens, minlength=5)
    assert counts[1] == 0
    p_value = chi_square_pvalue(counts.tolist(), probs.tolist())
    print(f"sample: chi-square p = {p_value:.4f}")
    assert p_value > 1e-3


def test_sample_keeps_leading_dims_and_is_reproducible() -> None:
    probs = torch.softmax(torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(5)), -1)
    first = sample(probs, make_generator(7))
    assert first.shape == (3, 4)
    assert torch.equal(first, sample(probs, make_generator(7)))
    assert not torch.equal(first, sample(probs, make_generator(8)))


def test_sample_one_hot_is_deterministic() -> None:
    probs = probs_from_logits(torch.randn(64, 9), SamplingParams())
    assert torch.equal(sample(probs, make_generator(None)), probs.argmax(-1))


def test_make_generator_seeds() -> None:
    a = torch.rand(4, generator=make_generator(2**64 - 1))
    assert torch.equal(a, torch.rand(4, generator=make_generator(2**64 - 1)))
    assert not torch.equal(a, torch.rand(4, generator=make_generator(2**64 - 2)))
    assert make_generator(None, "cpu").device == torch.device("cpu")
