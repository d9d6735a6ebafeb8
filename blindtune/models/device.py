"""Where models compute: `--device auto|cpu|cuda` (config `device:`) and bf16 on CUDA.

`auto` is CUDA when torch sees a GPU, else the CPU. On the CPU models stay float32 (bf16 is refused:
CPU bf16 matmuls are slow and lossy); on CUDA `bf16` halves memory. A party's code runs inside
`placed(...)`, and the models it loads (`load_model`, a handed-out artefact) go to that device and
dtype; every compute path moves its inputs to its model's device (`encoding.model_device`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn


class DeviceName(enum.StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class DeviceError(ValueError):
    """The asked-for device or precision is not available here."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


CPU = Placement(torch.device("cpu"), torch.float32)
_ACTIVE: ContextVar[Placement] = ContextVar("placement", default=CPU)


def resolve_placement(device: DeviceName | str = DeviceName.AUTO, bf16: bool = False) -> Placement:
    """The device and dtype a run computes with; CUDA asked for but absent, or bf16 on the CPU, is an error."""
    name = DeviceName(device)
    available = torch.cuda.is_available()
    if name is DeviceName.CUDA and not available:
        raise DeviceError("device cuda: torch sees no CUDA GPU (use --device auto or cpu)")
    use_cuda = name is DeviceName.CUDA or (name is DeviceName.AUTO and available)
    if bf16 and not use_cuda:
        raise DeviceError("bf16 needs a CUDA device; on the CPU models stay float32")
    if not use_cuda:
        return CPU
    return Placement(torch.device("cuda"), torch.bfloat16 if bf16 else torch.float32)


def active_placement() -> Placement:
    return _ACTIVE.get()


@contextmanager
def placed(placement: Placement) -> Iterator[Placement]:
    """Models loaded inside the block go to `placement`."""
    token = _ACTIVE.set(placement)
    try:
        yield placement
    finally:
        _ACTIVE.reset(token)


def place(model: nn.Module, placement: Placement | None = None) -> nn.Module:
    """`model` moved to the placement (the active one by default), floating-point weights in its dtype."""
    placement = placement or active_placement()
    return model.to(device=placement.device, dtype=placement.dtype)
