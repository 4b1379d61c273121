"""Conversions between user inputs (lists, numpy, torch) and the numpy arrays the engine takes.
torch is never imported here: a torch tensor can only arrive if the caller imported torch."""
from __future__ import annotations

import sys

import numpy as np


def is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and "torch" in sys.modules


def to_numpy(x, name: str):
    """Returns (array, torch_device or None)."""
    if x is None:
        return None, None
    if is_torch(x):
        torch = sys.modules["torch"]
        dev = x.device
        t = x.detach()
        if t.dtype in (torch.bfloat16,):
            t = t.float()
        return t.cpu().numpy(), dev
    try:
        return np.asarray(x), None
    except Exception as e:  # ragged lists etc.
        raise ValueError(f"{name} cannot be read as an array: {e}") from None


def int_array(x, name: str, ndim: int = 2) -> np.ndarray:
    a, _ = to_numpy(x, name)
    if a.dtype == np.bool_:
        a = a.astype(np.int64)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D [batch, tokens], got shape {list(a.shape)}")
    return a


def mask_array(x, name: str = "attention_mask") -> np.ndarray:
    """A [batch, tokens] mask of 0/1 as uint8; integer, bool or float (0.0/1.0) input."""
    a, _ = to_numpy(x, name)
    if a.dtype.kind == "f" and a.size and np.all((a == 0) | (a == 1)):
        a = a.astype(np.int64)
    a = int_array(a, name)
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"{name} must hold only 0 and 1")
    return np.ascontiguousarray(a, dtype=np.uint8)


def ids_array(x, name: str = "input_ids") -> np.ndarray:
    a = int_array(x, name)
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {list(a.shape)}); give at least one token")
    if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} holds values outside the int32 range")
    return np.ascontiguousarray(a, dtype=np.int32)


def output(a, torch_device):
    """numpy -> torch (on torch_device) when the inputs were torch, else numpy."""
    if a is None or torch_device is None:
        return a
    torch = sys.modules["torch"]
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if str(torch_device) == "cpu" else t.to(torch_device)


def scalar(v, torch_device, dtype=np.float32):
    if torch_device is None:
        return np.asarray(v, dtype=dtype)[()]
    torch = sys.modules["torch"]
    return torch.tensor(float(v), dtype=torch.float32, device=torch_device)
