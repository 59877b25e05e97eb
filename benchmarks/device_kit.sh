#!/usr/bin/env bash
# Gathers here what benchmarks/device_run.sh needs on the lent GPU machine, which reaches no
# package registry: wheels (Python 3.12, manylinux x86-64) of the packages its image lacks, in
# .whl/, and pbmc3k in .gpudata/. Both are git-ignored (.git/info/exclude) and travel with
# `run`'s carry. About 27 MiB of wheels and 9 MiB of data, under carry's 64 MiB.
#
# Versions are those of the scvi-tools venv here (scvi-tools 1.4.2 and the scverse stack it
# was measured with). The image has torch 2.11, numpy, scipy, h5py, matplotlib, tqdm, numba,
# lightning, torchmetrics, xarray, jax, flax and the rest (.library/device/KINDS.md);
# docrep has no wheel on PyPI and is built here (pure Python).
#
#     bash benchmarks/device_kit.sh        # from the project root, once per checkout
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .whl .gpudata
for d in /.whl/ /.gpudata/; do
    grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"
done
wheels=(
    anndata==0.12.19 array-api-compat==1.16.0 donfig==0.8.1.post1 google-crc32c==1.9.0
    legacy-api-wrap==1.5 ml-collections==1.1.0 mudata==0.3.10 natsort==8.4.0
    numcodecs==0.16.6 pandas==2.3.3 pynndescent==0.7.0 pyro-api==0.1.2 pyro-ppl==1.9.2
    pytz==2026.6 scanpy==1.11.5 scikit-misc==0.5.3 scverse-misc==0.0.3 scvi-tools==1.4.2
    session-info2==0.4.1 sparse==0.19.3 tzdata==2026.6 umap-learn==0.5.12 zarr==3.1.6
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "${wheels[@]}"
"$PY" -m pip wheel -q --no-deps -w .whl docrep==0.3.2
data=${OMICVAE_SC_DATA:-../shared/data}
cp "$data/pbmc3k.h5ad" .gpudata/
du -sh .whl .gpudata
