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
mkdir -p "$OUT/corpus" "$OUT/findings"
# the first clang that links a fuzzer (a clang without its runtime package cannot)
if [ -z "${CC:-}" ]; then
    for cand in $(command -v clang) $(ls /usr/bin/clang-[0-9]* 2>/dev/null | sort -V -r); do
        if echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { return d && n < 0; }' |
            "$cand" -x c -fsanitize=fuzzer,address,undefined - -o "$OUT/probe" 2>/dev/null; then
            CC=$cand
            break
        fi
    done
fi
if [ -z "${CC:-}" ]; then
    echo "fuzz/run.sh: no clang with libFuzzer found (Debian: apt-get install clang libclang-rt-dev; or set CC)" >&2
    exit 2
fi
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
if [ -n "$(find "$OUT/findings" -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) -print -quit)" ]; then
    echo "fuzz/run.sh: the C target found a problem: $(ls "$OUT"/findings)" >&2
    exit 1
fi
python fuzz/fuzz_loader.py --seconds "$PY_SECONDS" --findings "$OUT/findings"
