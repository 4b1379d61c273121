"""Writes the hostile safetensors regression inputs (issue 17) to tests/data/fuzz_seeds/:
each is a small file the reader must reject with a ValueError (tests/test_hostile.py checks
that), and each seeds the fuzz harness's corpus.

    python tools/make_hostile_seeds.py
"""
import json
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "fuzz_seeds")


def entry(shape=(1,), offsets=(0, 4), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def write(name, header, data, header_len=None):
    h = header if isinstance(header, bytes) else header.encode()
    with open(os.path.join(OUT, f"hostile_{name}.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h) if header_len is None else header_len) + h + data)


def main():
    os.makedirs(OUT, exist_ok=True)
    e = json.dumps
    padded = e({"model.norm.weight": entry((4,), (0, 16))}) + "    "
    write("header_len_one_short", padded, b"\x00\x00\x80\x3f" * 4, len(padded) - 1)
    write("gap_between_tensors", e({"a": entry(offsets=(0, 4)), "b": entry(offsets=(8, 12))}), b"\0" * 12)
    write("overlapping_tensors", e({"a": entry((2,), (0, 8)), "b": entry((2,), (4, 12))}), b"\0" * 12)
    write("trailing_data", e({"a": entry()}), b"\0" * 5)
    write("length_mismatch", e({"a": entry((3,), (0, 8))}), b"\0" * 8)
    write("escaped_names_duplicate",
          '{"\\u00e9": %s, "\u00e9": %s}' % (e(entry(offsets=(0, 4))), e(entry(offsets=(4, 8)))), b"\0" * 8)
    write("lone_high_surrogate", '{"\\ud83d": %s}' % e(entry()), b"\0" * 4)
    write("lone_low_surrogate", '{"\\ude00": %s}' % e(entry()), b"\0" * 4)
    write("bad_hex_escape", '{"\\u12g4": %s}' % e(entry()), b"\0" * 4)
    write("nul_escape", '{"\\u0000": %s}' % e(entry()), b"\0" * 4)
    write("non_utf8_name", b'{"ab\xff": ' + e(entry()).encode() + b"}", b"\0" * 4)
    write("overlong_utf8", b'{"ab\xc0\xaf": ' + e(entry()).encode() + b"}", b"\0" * 4)
    write("control_char_in_name", '{"a\tb": %s}' % e(entry()), b"\0" * 4)


if __name__ == "__main__":
    main()
