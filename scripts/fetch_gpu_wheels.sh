#!/usr/bin/env bash
# Wheels bench/gpu_check.py needs on the GPU machine, downloaded here into gpu_wheels/ (git-ignored) and carried
# in the working tree (the device tool's `carry`; 64 MiB in all with the tree).
#
# The GPU machine: python3 3.12, torch 2.11+cu130, transformers, peft, accelerate, sentencepiece, tiktoken,
# safetensors, numpy, pandas, rich, pytest preinstalled; no network. Missing there and needed by the check:
#   hydra-core, omegaconf, antlr4-python3-runtime  -> the project's config (the CLI and `compose`)
#   datasets, pyarrow, dill, multiprocess, xxhash   -> the project's data pipeline (the CLI case)
#   bitsandbytes                                    -> QLoRA nf4
# Not carried (too big or not needed): mlflow (the CLI runs with tracking=none), jieba/nltk/rouge-chinese
# (the CLI scores with data.metrics=[accuracy]), deepspeed, torch/CUDA (preinstalled there; never here).
#
# To fit, two wheels are slimmed (RECORD rewritten, nothing else changed):
#   bitsandbytes: only the CUDA library matching the GPU machine's torch (cuda130, BNB_KEEP) and the CPU one;
#                 the other CUDA/ROCm/XPU builds (~37 MB) are dropped.
#   pyarrow:      the Arrow Flight and S3 libraries (~17 MB), which no module `datasets` imports links, are dropped.
#
# usage: scripts/fetch_gpu_wheels.sh [DEST]      (default gpu_wheels; prints each size and the total)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-gpu_wheels}
PY=${PYTHON:-python}
BNB_KEEP=${BNB_KEEP:-cuda130}
rm -rf "$DEST"
mkdir -p "$DEST"

# CPython 3.12, manylinux x86_64, binary wheels only, dependencies listed explicitly (the machine has the rest)
"$PY" -m pip download --quiet --disable-pip-version-check -d "$DEST" \
    --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --only-binary=:all: --no-deps \
    "hydra-core==1.3.8" "omegaconf==2.3.1" \
    "datasets==5.2.0" "pyarrow==25.0.1" "dill==0.4.1" "multiprocess==0.70.19" "xxhash==4.1.0" \
    "bitsandbytes==0.50.2"

# omegaconf 2.3 pins antlr4-python3-runtime 4.9.*, published as a source archive only: build its (pure Python) wheel
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$DEST" "antlr4-python3-runtime==4.9.3"

"$PY" - "$DEST" "$BNB_KEEP" <<'EOF'
"""Drop the named members of a wheel and their RECORD lines (pip installs what RECORD lists)."""
import base64, hashlib, re, sys, zipfile
from pathlib import Path

dest, bnb_keep = Path(sys.argv[1]), sys.argv[2]


def slim(wheel: Path, drop) -> None:
    tmp = wheel.with_suffix(".tmp")
    dropped = 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        kept = [i for i in src.infolist() if not drop(i.filename)]
        dropped = sum(i.file_size for i in src.infolist() if drop(i.filename))
        for info in kept:
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines() if ln and not drop(ln.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            out.writestr(info, data)
    tmp.replace(wheel)
    print(f"slimmed {wheel.name}: dropped {dropped / 2**20:.1f} MiB uncompressed")


for wheel in dest.glob("bitsandbytes-*.whl"):
    keep = {f"libbitsandbytes_{bnb_keep}.so", "libbitsandbytes_cpu.so"}
    slim(wheel, lambda n: bool(re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", n)) and n.split("/")[-1] not in keep)
for wheel in dest.glob("pyarrow-*.whl"):
    slim(wheel, lambda n: bool(re.search(r"^pyarrow/(libarrow_flight|libarrow_python_flight|_flight\.|libarrow_s3\.)", n)))
EOF

echo "wheels in $DEST (CPython 3.12, manylinux x86_64):"
total=0
for f in "$DEST"/*.whl; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    awk -v s="$size" -v n="$(basename "$f")" 'BEGIN { printf "  %8.2f MiB  %s\n", s / 1048576, n }'
done
awk -v s="$total" 'BEGIN { printf "  %8.2f MiB  total\n", s / 1048576 }'
