#!/usr/bin/env bash
# The GPU figures of docs/performance.md's speed section in one short run (a few minutes on one GPU):
# bench.compare on CUDA for every precision, channels-last and compile, on the 32x32x3
# SongUNet (SiDA) and the embedded default's network (SiD). JSON files and the log go to $1.
#   SIDA_AUTHORS_REPO=<checkout of the authors' code> bash bench/gpu.sh OUT_DIR
set -euo pipefail
: "${SIDA_AUTHORS_REPO:?set it to a checkout of the authors' code at bench.authors.AUTHORS_COMMIT (docs/authors-code.md)}"
out=${1:?usage: bash bench/gpu.sh OUT_DIR}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
cmp() { python -m bench.compare --device cuda --threads 4 "$@" 2>&1 | tee -a "$out/log.txt"; }
cmp --preset small32 --phase sida --ours fp32,fp32-cl,bf16,bf16-cl,fp16 --iters 20 --warmup 3 --json "$out/small32.json"
cmp --preset small32 --phase sida --ours fp32-compile,bf16-cl-compile --iters 20 --first 3 --json "$out/small32-compile.json"
cmp --preset digits --phase sid --ours fp32,bf16,fp32-compile --iters 20 --first 3 --json "$out/digits.json"
