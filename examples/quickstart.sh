#!/usr/bin/env bash
# The five commands of wgen on the built-in benchmark, digits-hard (what `wgen demo` runs; minutes on 2 CPU cores).
set -euo pipefail
out=${1:-quickstart}
wgen zoo -a test_resnet -d digits-hard -n 16 --epochs 4 -o "$out/zoo"   # train a zoo (only if you have none)
wgen canonicalize "$out/zoo" -o "$out/canon"                            # permutation-align it
wgen train "$out/canon" -o "$out/gen" --holdout 0.25   # codes, the default (the zoo records its data); 4 members held out
wgen sample "$out/gen" -n 32 -o "$out/samples"                          # 32 new timm checkpoints
wgen eval "$out/samples" --zoo "$out/canon" --out "$out/report.json" --plot "$out/report.png"
