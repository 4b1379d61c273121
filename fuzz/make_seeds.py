"""Writes the seed corpus of the safetensors fuzz target into a directory: every checkpoint
under tests/data (the hostile-file regressions in tests/data/fuzz_seeds included) with its
header kept and each tensor shrunk to a few elements, so that mutations reach the header
parser instead of being spent on weight bytes; and a few hand-made corner cases."""
import glob
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1}


def pack(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def shrunk(path: str) -> bytes:
    """The file's header with every tensor reshaped to at most [2, 2] (offsets recomputed)."""
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    out, offset = {}, 0
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            out[name] = entry
            continue
        shape = [min(int(d), 2) for d in entry.get("shape", [])]
        count = 1
        for d in shape:
            count *= d
        size = count * SIZES.get(entry.get("dtype"), 1)
        out[name] = dict(entry, shape=shape, data_offsets=[offset, offset + size])
        offset += size
    return pack(out, (bytes(range(256)) * (offset // 256 + 1))[:offset])


def main(dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    seeds = {
        "empty_header": pack({}, b""),
        "metadata_only": pack({"__metadata__": {"format": "pt"}}, b""),
        "one_of_each": pack({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F16", "shape": [1, 2], "data_offsets": [8, 12]},
                             "c": {"dtype": "BF16", "shape": [], "data_offsets": [12, 14]},
                             "d": {"dtype": "I8", "shape": [2], "data_offsets": [14, 16]},
                             "e": {"dtype": "U8", "shape": [0], "data_offsets": [16, 16]}}, bytes(16)),
        "escapes": pack({"w\\u00e9\"\\n": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    }
    files = sorted(glob.glob(os.path.join(ROOT, "tests", "data", "**", "*.safetensors"), recursive=True))
    files += sorted(glob.glob(os.path.join(ROOT, "xoron", "demo", "*.safetensors")))
    for path in files:
        tag = os.path.relpath(path, ROOT).replace(os.sep, "_")
        try:
            seeds[tag] = shrunk(path)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error, AttributeError):
            pass  # a deliberately broken regression file: kept as it is below
        if os.path.getsize(path) <= 1 << 20:
            with open(path, "rb") as f:
                seeds[tag + ".whole"] = f.read()
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "data", "fuzz_seeds", "**", "*"), recursive=True)):
        if os.path.isfile(path) and os.path.getsize(path) <= 1 << 20:
            with open(path, "rb") as f:
                seeds["fuzz_seeds_" + os.path.relpath(path, ROOT).replace(os.sep, "_")] = f.read()
    for tag, data in seeds.items():
        with open(os.path.join(dest, tag), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {dest}")


if __name__ == "__main__":
    main(sys.argv[1])
