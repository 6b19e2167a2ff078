#!/usr/bin/env bash
# GPU check: verify towerrec's CUDA path on one GPU machine that has PyTorch but no torchrec/fbgemm
# and no network (the H200 lent to some sessions: python3 3.12, torch 2.11.0+cu130).
#
# fbgemm/torchrec releases pair with exact torch releases (1.8.x <-> torch 2.13, 1.9.x <-> 2.14),
# so torch 2.11 takes fbgemm-gpu 1.6.0 + torchrec 1.6.1 (cp312; fbgemm-gpu's PyPI wheel, ~465 MB).
#
#   1. here (network):   benchmarks/gpu_check.sh fetch
#        downloads the wheels into .whl/ (git-ignored) and splits fbgemm-gpu into .whl/part-NN
#        pieces of 60 MB, because one device call carries at most 64 MiB.
#   2. there, one call per piece, machine kept warm between calls (pieces stay in place):
#        carry [".whl/part-00"], command "ls .whl"  ... then part-01, part-02, ...
#   3. there, last call: carry [".whl/small"], command "bash benchmarks/gpu_check.sh run"
#        joins the pieces, installs into /tmp/site, runs the GPU-marked tests and the one-GPU
#        benchmark (benchmarks/gpu_bench.py: 26 tables up to 10M x 128, MMoE, batch 16K, bf16),
#        and writes everything to $OUT (or ./gpu-check-out). About 5-8 minutes on an H200.
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
  sed -n '2,20p' "$0"; exit 2 ;;
esac
