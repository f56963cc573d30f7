"""Flash-offloaded FFN weights for the edge's SLM ("LLM in a Flash", Alizadeh et al. 2023).

`pack_model` lays a checkpoint out for flash, `edge_node.flash.calibrate` trains its
sparsity predictors, and `load_flash_model` returns a Transformer whose FFN weights are
read from flash into a fixed DRAM budget as they are needed.
"""

from edge_node.flash.ffn import FlashFeedForward, flash_store, load_flash_model
from edge_node.flash.pack import FlashManifest, load_dense, pack_model, read_manifest
from edge_node.flash.store import BudgetError, FlashStore, StepMetrics, StoreOptions

__all__ = [
    "BudgetError",
    "FlashFeedForward",
    "FlashManifest",
    "FlashStore",
    "StepMetrics",
    "StoreOptions",
    "flash_store",
    "load_dense",
    "load_flash_model",
    "pack_model",
    "read_manifest",
]
