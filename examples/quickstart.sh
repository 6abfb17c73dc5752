#!/usr/bin/env bash
# The five commands of wgen on the built-in digits data (about 5 minutes on 2 CPU cores).
set -euo pipefail
out=${1:-quickstart}
wgen zoo -a test_resnet -d digits -n 16 -o "$out/zoo"             # train a zoo (only if you have none)
wgen canonicalize "$out/zoo" -o "$out/canon"                      # permutation-align it
wgen train "$out/canon" -o "$out/gen" --batch-size 128 --width 256  # flow matching (small net: minutes on a CPU)
wgen sample "$out/gen" -n 100 -o "$out/samples"                   # 100 new timm checkpoints
wgen eval "$out/samples" --zoo "$out/canon" -d digits --out "$out/report.json" --plot "$out/report.png"
