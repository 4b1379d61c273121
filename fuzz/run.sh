#!/usr/bin/env bash
# Builds the fuzz targets with ASan+UBSan and fuzzes for SECONDS in all (default 60): two
# thirds for the C safetensors reader (libFuzzer), one third for the Python loader path
# (fuzz_loader.py, mutated checkpoint directories through from_pretrained, on the xoron
# importable from the repository root). Exits non-zero on any finding. Needs clang with its
# fuzzer runtime (Debian: apt-get install clang libclang-rt-dev, or a versioned clang-N).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${1:-60}
OUT=${XORON_FUZZ_OUT:-build/fuzz}
CC=${CC:-$(command -v clang || ls /usr/bin/clang-[0-9]* 2>/dev/null | sort -V | tail -1 || true)}
if [ -z "$CC" ] || ! "$CC" --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: clang not found (set CC)" >&2
    exit 2
fi
mkdir -p "$OUT/corpus" "$OUT/findings"
"$CC" -std=c11 -g -O1 -fno-omit-frame-pointer -D_GNU_SOURCE -Icsrc -Wall -Wextra \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    fuzz/fuzz_safetensors.c csrc/engine/safetensors.c csrc/engine/status.c csrc/engine/tensor.c \
    -o "$OUT/fuzz_safetensors"
python fuzz/make_seeds.py "$OUT/seeds"
C_SECONDS=$(( SECONDS_TOTAL * 2 / 3 ))
PY_SECONDS=$(( SECONDS_TOTAL - C_SECONDS ))
# the corpus persists in $OUT/corpus between runs; findings land in $OUT/findings
"$OUT/fuzz_safetensors" -max_total_time="$C_SECONDS" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$OUT/findings/" -print_final_stats=1 "$OUT/corpus" "$OUT/seeds" 2>&1 \
    | grep -E "^(#[0-9]+ +DONE|stat::|==|SUMMARY|INFO: Seed|.*ERROR)" || true
if ls "$OUT"/findings/crash-* "$OUT"/findings/leak-* "$OUT"/findings/timeout-* >/dev/null 2>&1; then
    echo "fuzz/run.sh: the C target found a problem: $(ls "$OUT"/findings)" >&2
    exit 1
fi
python fuzz/fuzz_loader.py --seconds "$PY_SECONDS" --findings "$OUT/findings"
