"""Errors raised by the model core.

A checkpoint problem is a user problem (a wrong path, a half-copied file, an unsupported
model), so it gets its own class that callers can report without a traceback.
"""


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded.

    The message names the offending file and what is wrong with it, e.g.
    ``"model.safetensors: missing tensor model.layers.0.mlp.up_proj.weight"``.
    """
