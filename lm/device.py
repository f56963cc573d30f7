"""Device and dtype defaults, and the one host-to-device copy the model core needs.

CUDA is picked automatically when present; everything also runs on CPU.
"""

from collections.abc import Sequence

import torch


def default_device() -> torch.device:
    """The first CUDA device when one is available, otherwise the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on CUDA (fast, range of float32), float32 elsewhere (CPU half kernels are slow)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def host_to_device(values: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """A LongTensor (len(values),) on `device`, copied without blocking the host.

    Cache lengths live on the host so that the forward pass never waits for the GPU;
    the small index tensors built from them go through pinned memory on CUDA, which
    makes the copy asynchronous instead of a stream synchronisation.
    """
    host = torch.tensor(list(values), dtype=torch.long)
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
