"""Everything that makes or measures a model, kept out of the inference core (`lm`).

Training (`train`), distillation of a draft model (`distill`) and of a draft head
(`head_distill`, `lookahead`), held-out evaluation (`evaluate`), the training corpus
(`corpus`), byte-level BPE training (`bpe`) and fitting sparsity predictors
(`predictors`). These modules import the core; the core never imports them.
"""
