"""Writing safetensors files (save_pretrained). Reading is done by the C engine."""
from __future__ import annotations

import json
import struct

import numpy as np

_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def save_file(tensors: dict, path: str, metadata: dict | None = None, bfloat16: bool = False) -> None:
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if bfloat16:
            u = a.astype(np.float32).view(np.uint32)
            # round to nearest even, as the engine's converter does
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            data, dtype = u.tobytes(), "BF16"
        else:
            if a.dtype not in _DTYPES:
                a = a.astype(np.float32)
            data, dtype = a.tobytes(), _DTYPES[a.dtype]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
