#!/usr/bin/env bash
# launch/torchrun.sh -- thin wrapper around torchrun (torch.distributed.run) for towerrec.
#
# Usage:
#   launch/torchrun.sh [options] [--] <trainer args...>
#
#   one node (standalone rendezvous on a free local port):
#     launch/torchrun.sh -- fit --config configs/x.yaml
#     launch/torchrun.sh --nproc 2 -- fit --config configs/x.yaml
#   several nodes (run once per node, same --endpoint and --rdzv-id everywhere):
#     launch/torchrun.sh --nnodes 2 --node-rank 0 --endpoint node0:29400 -- fit --config X   # on node0
#     launch/torchrun.sh --nnodes 2 --node-rank 1 --endpoint node0:29400 -- fit --config X   # on node1
#
# Options:
#   --nproc N          processes on this node (default: number of GPUs from `nvidia-smi -L`;
#                      1 without GPUs -- on CPU more processes only pay off for DDP tests or
#                      many cores; torchrun then sets OMP_NUM_THREADS=1 unless it is set)
#   --nnodes N         number of nodes (default 1). N>1 (or a range "MIN:MAX") needs --endpoint.
#   --node-rank R      this node's rank (default 0). The c10d rendezvous assigns the final group
#                      ranks itself; R=0 marks the node that hosts the rendezvous store
#                      (rdzv_conf is_host=1), so start node 0 on the --endpoint host.
#   --endpoint H:P     c10d rendezvous endpoint (TCPStore on host H, port P), reachable by all
#   --rdzv-id ID       rendezvous/job id, identical on all nodes (default ${TOWERREC_RDZV_ID:-towerrec})
#   --max-restarts K   restart the whole worker group up to K times on a failure (default 0);
#                      the trainer resumes from <run_dir>/checkpoints/latest on each restart
#   --script PATH      run a Python script instead of `-m towerrec.trainer.cli` (tests, debugging)
#   --module MOD       run another module instead of trainer.cli
#   --python PY        interpreter (default: $TOWERREC_PYTHON, else <repo>/.venv/bin/python,
#                      else python3); torchrun starts the workers with the same interpreter
#   --dry-run          print the torchrun command and exit
#   --                 end of wrapper options; everything after goes to the trainer/script
#   Extra torchrun options: TOWERREC_TORCHRUN_ARGS="--log-dir=/tmp/x --redirects=3" (word-split).
#
# Restarts: the wrapper exports TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (unless set): without it a
# restarted worker group reads the previous attempt's addresses and fails (pytorch/pytorch#135712).
#
# Each worker gets from torchrun: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK,
# MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT (Lightning detects torchelastic itself).
# `towerrec` comes from the installed package (`make setup`: `pip install -e .`); the repository root is
# also prepended to PYTHONPATH so a --script can import `benchmarks` or `tests` from any directory.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

NPROC=""
NNODES=1
NODE_RANK=0
ENDPOINT=""
RDZV_ID="${TOWERREC_RDZV_ID:-towerrec}"
MAX_RESTARTS=0
SCRIPT=""
MODULE="towerrec.trainer.cli"
PY="${TOWERREC_PYTHON:-}"
DRY_RUN=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc|--nproc-per-node|--nproc_per_node) NPROC="${2:?$1 needs a value}"; shift 2 ;;
    --nnodes)       NNODES="${2:?--nnodes needs a value}"; shift 2 ;;
    --node-rank|--node_rank) NODE_RANK="${2:?--node-rank needs a value}"; shift 2 ;;
    --endpoint|--rdzv-endpoint) ENDPOINT="${2:?--endpoint needs HOST:PORT}"; shift 2 ;;
    --rdzv-id|--rdzv_id) RDZV_ID="${2:?--rdzv-id needs a value}"; shift 2 ;;
    --max-restarts|--max_restarts) MAX_RESTARTS="${2:?--max-restarts needs a value}"; shift 2 ;;
    --script)       SCRIPT="${2:?--script needs a path}"; shift 2 ;;
    --module)       MODULE="${2:?--module needs a name}"; shift 2 ;;
    --python)       PY="${2:?--python needs a path}"; shift 2 ;;
    --dry-run)      DRY_RUN=1; shift ;;
    -h|--help)      usage; exit 0 ;;
    --)             shift; break ;;
    *)              break ;;   # first unknown word: the trainer's arguments start here
  esac
done

[[ "$NPROC" =~ ^[0-9]+$ || -z "$NPROC" ]] || die "--nproc must be a number"
[[ "$NNODES" =~ ^[0-9]+(:[0-9]+)?$ ]] || die "--nnodes must be N or MIN:MAX"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "--node-rank must be a number"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max-restarts must be a number"

if [[ -z "$NPROC" ]]; then
  ngpu=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    ngpu="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
  fi
  if [[ "${ngpu:-0}" -gt 0 ]]; then NPROC=$ngpu; else NPROC=1; fi
fi
[[ "$NPROC" -ge 1 ]] || die "--nproc must be >= 1"

if [[ -z "$PY" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi

cmd=("$PY" -m torch.distributed.run "--nproc-per-node=$NPROC" "--max-restarts=$MAX_RESTARTS")
if [[ "$NNODES" == 1 && -z "$ENDPOINT" ]]; then
  cmd+=(--standalone)
else
  [[ -n "$ENDPOINT" ]] || die "--nnodes $NNODES needs --endpoint HOST:PORT"
  [[ "$ENDPOINT" == *:* ]] || die "--endpoint must be HOST:PORT"
  if [[ "$NODE_RANK" == 0 ]]; then is_host=1; else is_host=0; fi
  cmd+=("--nnodes=$NNODES" "--node-rank=$NODE_RANK"
        --rdzv-backend=c10d "--rdzv-endpoint=$ENDPOINT" "--rdzv-id=$RDZV_ID"
        "--rdzv-conf=is_host=$is_host")
fi
# shellcheck disable=SC2206
[[ -n "${TOWERREC_TORCHRUN_ARGS:-}" ]] && cmd+=(${TOWERREC_TORCHRUN_ARGS})
if [[ -n "$SCRIPT" ]]; then
  cmd+=("$SCRIPT")
else
  cmd+=(-m "$MODULE")
fi
cmd+=("$@")

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Restarts (--max-restarts, or a node leaving/joining) need a fresh TCPStore for the workers'
# process group: with torch's default (workers share the rendezvous store, no per-attempt key
# prefix) the restarted ranks read the previous attempt's gloo/NCCL addresses and fail with
# "connectFullMesh failed ... Connection refused" (pytorch/pytorch#135712). 1 = the agent of group
# rank 0 picks a free port and worker rank 0 hosts a new store on it in every round.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
