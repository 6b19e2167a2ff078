#!/usr/bin/env bash
# GPU check: run towerrec's GPU tests and its one-GPU benchmark on a CUDA machine that has
# PyTorch but no network access (it cannot pip install torchrec or fbgemm-gpu itself).
#
# What you need: this checkout on a computer with network access and python3/pip, and the GPU
# machine: Linux x86-64, Python 3.12, a CUDA build of torch 2.11, lightning and pyarrow. fbgemm-gpu
# and torchrec are each built for one torch release (1.8.x for torch 2.13, 1.6.x for torch 2.11),
# so for torch 2.11 this fetches fbgemm-gpu 1.6.0 + torchrec 1.6.1 (set FBGEMM=... TORCHREC=...
# for another torch).
#
#   1. With network:        benchmarks/gpu_check.sh fetch
#      Downloads the wheels into .whl/ (git ignores it) and cuts fbgemm-gpu's ~465 MB wheel into
#      60 MB pieces, .whl/part-00, part-01, ..., for transfers that limit a file's size.
#   2. Copy the checkout, .whl/ included, to the GPU machine (all at once, or piece by piece).
#   3. On the GPU machine:  benchmarks/gpu_check.sh run
#      Joins the pieces and checks the wheel's sha256, installs the wheels into /tmp/site (nothing
#      system-wide), runs the GPU tests (tests/gpu, marked gpu) and the one-GPU benchmark
#      (benchmarks/gpu_bench.py: 26 tables up to 10M x 128, MMoE, batch 16K, bf16) and writes the
#      log and the benchmark's JSON into $OUT (default: ./gpu-check-out).
#   4. Record the device, versions, samples/s, peak memory and the tests that passed in
#      benchmarks/results/GPU.md, and update the README's verification table.
#
# Not yet run on a GPU: the first run may need fixes (check first that fbgemm_gpu imports there).
set -euo pipefail
cd "$(dirname "$0")/.."
FBGEMM=${FBGEMM:-fbgemm-gpu==1.6.0}
TORCHREC=${TORCHREC:-torchrec==1.6.1}
SMALL=(tensordict==0.10.0 iopath==0.1.10 portalocker==3.1.1 "$TORCHREC")
PLATFORM=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

case "${1:-}" in
fetch)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl/small .whl/big
  pip_download() { python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${PLATFORM[@]}" -d "$1" "${@:2}"; }
  pip_download .whl/small "${SMALL[@]}"
  pip_download .whl/big "$FBGEMM"
  wheel=$(ls .whl/big/*.whl)
  (cd .whl && rm -rf part-* && split -b 60M -d "big/$(basename "$wheel")" chunk- \
     && for c in chunk-*; do mkdir "part-${c#chunk-}"; mv "$c" "part-${c#chunk-}/"; done)
  basename "$wheel" > .whl/small/FBGEMM_WHEEL_NAME
  sha256sum "$wheel" | cut -d' ' -f1 > .whl/small/FBGEMM_SHA256
  echo "pieces: $(ls -d .whl/part-* | tr '\n' ' ')"
  ;;
run)
  out=${OUT:-gpu-check-out}
  mkdir -p "$out"
  exec > >(tee "$out/gpu_check.log") 2>&1
  nvidia-smi -L || true
  name=$(cat .whl/small/FBGEMM_WHEEL_NAME)
  cat .whl/part-*/chunk-* > "/tmp/$name"
  echo "$(cat .whl/small/FBGEMM_SHA256)  /tmp/$name" | sha256sum -c -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "/tmp/$name" .whl/small/*.whl
  # this checkout imports as `towerrec` through a link named so (the package is the repository root)
  mkdir -p /tmp/towerrec-src && ln -sfn "$PWD" /tmp/towerrec-src/towerrec
  export PYTHONPATH=/tmp/site:/tmp/towerrec-src:$PWD
  python3 -c "import torch, fbgemm_gpu, torchrec; print('torch', torch.__version__, 'torchrec', torchrec.__version__, 'cuda', torch.cuda.is_available())"
  python3 -m pytest -q -m gpu tests/gpu 2>&1 | tail -30
  timeout 300 python3 -m benchmarks.gpu_bench --batch-size 16384 --steps 60 | tee "$out/gpu_bench.json"
  ;;
*)
  sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 2 ;;
esac
