#!/usr/bin/env bash
# The GPU figures of benchmarks/speed.py in one command on the lent GPU machine (an H200 or
# H100 with torch 2.11 and Python 3.12). Device time is short, so everything runs in one go,
# each stage under its own time limit, each writing its table to $OUT when it ends.
# Prepare here with benchmarks/device_kit.sh, then, with the device tool:
#
#     run(command="bash benchmarks/device_run.sh", carry=[".whl", ".gpudata"], timeout_s=600)
#
# or one stage a call, each with more time (the machine stays warm about 30 s between calls):
# command="STAGES=1 STAGE1_S=540 bash benchmarks/device_run.sh", then STAGES=2 STAGE2_S=540.
#
# Stages: versions and a CUDA check; (1) pbmc3k, 400 epochs: scvi-tools at batch 128 and 512,
# omicvae_sc at STAGE1_BATCHES and with its defaults; (2) one epoch over 1M cells resampled
# from pbmc3k: scvi-tools at 128, omicvae_sc at STAGE2_BATCHES, with inference timings;
# (3, STAGES="1 2 3") 100k synthetic cells: one process against the distributed path
# (torchrun, one process, DistributedDataParallel over NCCL) on the one GPU.
# omicvae_sc's fits run eagerly and as CUDA graphs (GRAPHS=both; off or on for one of them).
#
# A rehearsal here, on the CPU, of everything but the wheels (a few minutes):
#
#     INSTALL=0 DEVICE=cpu GRAPHS=off EPOCHS=5 LARGE_CELLS=20000 \
#         PYTHON=/work/main/.venv/bin/python SCVI_PYTHON=/work/venvs/scvi/bin/python \
#         OMICVAE_SC_DATA=../shared/data OUT=/tmp/rehearsal bash benchmarks/device_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/device_run.log") 2>&1
start=$SECONDS
if [ "${INSTALL:-1}" = 1 ] && [ ! -d /tmp/site/scvi ]; then  # a warm machine keeps /tmp/site
    wheels=(.whl/*.whl)
    # pandas 2.3.3 travels for anndata 0.12 (pandas < 3); used only if the image's is 3 or later
    major=$(python3 -c 'import pandas; print(pandas.__version__.split(".")[0])' 2>/dev/null)
    if [ "${major:-0}" -lt 3 ] && [ "${major:-0}" -gt 0 ]; then
        wheels=($(printf '%s\n' "${wheels[@]}" | grep -v '/pandas-'))
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}" || exit 1
fi
if [ "${INSTALL:-1}" = 1 ]; then
    export PYTHONPATH=/tmp/site:$PWD OMICVAE_SC_DATA=$PWD/.gpudata
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
PY=${PYTHON:-python3}
SCVI_PY=${SCVI_PYTHON:-$PY}
check() {  # versions of the stack under python $1, which must import $2
    "$1" - "$2" <<'EOF_PY'
import importlib
import sys

names = ["torch", "numpy", "pandas", "scipy", "anndata", "scanpy", sys.argv[1]]
print(sys.executable, *(f"{n} {importlib.import_module(n).__version__}" for n in names))
import torch

if torch.cuda.is_available():
    print("cuda:", torch.cuda.get_device_name(0))
EOF_PY
}
check "$PY" omicvae_sc || exit 1
scvi=(--scvi-python "$SCVI_PY")
if ! check "$SCVI_PY" scvi; then  # the absolute figures (1M cells in 2 s) still count
    echo "scvi-tools does not import: omicvae_sc alone"
    scvi=()
    unset SCVI_PYTHON  # speed.py's default for --scvi-python
fi
echo "setup took $((SECONDS - start)) s"
common=(--device "$DEVICE" "${scvi[@]}" --threads "${THREADS:-8}"
        --epochs "${EPOCHS:-400}" --cuda-graphs "${GRAPHS:-both}" --keep-going)
stages=${STAGES:-1 2}
if [[ " $stages " == *" 1 "* ]]; then
    timeout "${STAGE1_S:-250}" "$PY" benchmarks/speed.py "${common[@]}" --parts pbmc3k \
        --batch-sizes ${STAGE1_BATCHES:-128 512} --scvi-batch-sizes 128 512 \
        --csv "$OUT/pbmc3k.csv"
    echo "stage 1 (pbmc3k) rc $? at $((SECONDS - start)) s"
fi
if [[ " $stages " == *" 2 "* ]]; then
    timeout "${STAGE2_S:-280}" "$PY" benchmarks/speed.py "${common[@]}" --parts large \
        --large-cells "${LARGE_CELLS:-1000000}" --large-batch-sizes ${STAGE2_BATCHES:-1024 8192} \
        --csv "$OUT/large.csv"
    echo "stage 2 (large) rc $? at $((SECONDS - start)) s"
fi
if [[ " $stages " == *" 3 "* ]]; then  # issue 20: the distributed path on one GPU
    "$PY" -c "import omicvae_sc as ov; ov.datasets.synthetic_counts(${DIST_CELLS:-100000}, 2000,
seed=0).write_h5ad('/tmp/dist_cells.h5ad')"
    timeout "${STAGE3_S:-120}" "$PY" benchmarks/distributed.py --part speed --device "$DEVICE" \
        --h5ad /tmp/dist_cells.h5ad --epochs "${DIST_EPOCHS:-3}" --threads "${THREADS:-8}" \
        | tee "$OUT/distributed.md"
    echo "stage 3 (distributed path) rc $? at $((SECONDS - start)) s"
fi
