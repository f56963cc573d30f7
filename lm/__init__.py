"""The language-model core that edge and cloud share. Knows nothing of gRPC or Ray."""

from lm.acceptance import Acceptance, DraftDistribution, verify_tree
from lm.checkpoint import load_model, save_model
from lm.config import ModelConfig
from lm.draft_head import DraftHead, DraftHeadConfig, HeadDraft, load_head, save_head
from lm.errors import CheckpointError
from lm.kv_cache import KVCache
from lm.model import Transformer
from lm.sampling import SamplingParams, make_generator, probs_from_logits, sample
from lm.tokenizer import IncrementalDetokenizer, Tokenizer
from lm.tree import TokenTree, TreeError

__all__ = [
    "Acceptance",
    "CheckpointError",
    "DraftDistribution",
    "DraftHead",
    "DraftHeadConfig",
    "HeadDraft",
    "IncrementalDetokenizer",
    "KVCache",
    "ModelConfig",
    "SamplingParams",
    "TokenTree",
    "Tokenizer",
    "Transformer",
    "TreeError",
    "load_head",
    "load_model",
    "make_generator",
    "probs_from_logits",
    "sample",
    "save_head",
    "save_model",
    "verify_tree",
]
