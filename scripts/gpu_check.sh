#!/usr/bin/env bash
# The first GPU run, in one command: GPU-marked tests, then the training, attention,
# precision, fp8, parallel-memory and compression benchmarks, into one Markdown report.
#
#   bash scripts/gpu_check.sh [report.md]        # default: gpu_report.md in the repo root
#
# Needs a CUDA machine with the repo's requirements installed. Each section records its
# command and exit status, so a failing part shows in the report instead of stopping it.
# MFU is against the card's dense peak for the run's dtype (tfx/flops.py GPU_PEAK_TFLOPS,
# from the vendors' datasheets: H100/H200 SXM bf16 989 TFLOPS, fp8 1979, A100 312, L40S 362).
set -u
cd "$(dirname "$0")/.."
OUT="${1:-gpu_report.md}"
export WANDB_MODE=offline

python - <<'PY' || { echo "no CUDA device: nothing to check" >&2; exit 1; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY

{
  echo "# tfx GPU check ($(date -u +%Y-%m-%d))"
  echo
  python - <<'PY'
import platform, torch
p = torch.cuda.get_device_properties(0)
print(f"- card: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, "
      f"{p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
print(f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"Python {platform.python_version()}")
try:
    import torchao; print(f"- torchao {torchao.__version__}")
except Exception as e:
    print(f"- torchao not importable: {e}")
PY
  echo
} > "$OUT"

section() {  # section "title" command...
  local title="$1"; shift
  echo "running: $title" >&2
  local log; log="$(mktemp)"
  local start=$SECONDS
  "$@" > "$log" 2>&1
  local rc=$?
  {
    echo "## $title"
    echo
    echo "\`$*\` — exit $rc, $((SECONDS - start)) s"
    echo
    if grep -q '^|' "$log"; then grep -E '^(\||#|[A-Za-z].*:)' "$log" | grep -v '^Traceback'; else echo '```'; tail -n 40 "$log"; echo '```'; fi
    echo
  } >> "$OUT"
  rm -f "$log"
}

section "GPU-marked and CUDA-dependent tests" python -m pytest -q -m gpu -p no:cacheprovider
section "fp8 (torchao float8) and precision tests on CUDA" \
  python -m pytest -q -p no:cacheprovider tests/test_fp8.py tests/test_train.py -k "precision or fp8"
section "Training step: tfx vs plain PyTorch vs HF; bf16/fp16/compile/checkpointing; tokens/s, MFU" \
  python scripts/bench_train.py
section "Sparse attention: FlexAttention vs dense causal SDPA" \
  python scripts/bench_attention.py --lengths 1024 4096 16384 --dtype bfloat16
section "FSDP/DDP/TP memory and bytes per rank (all visible GPUs)" python scripts/bench_parallel.py
section "Compression: pruning, 2:4, PTQ (int4 weight-only on CUDA), QAT, distillation" \
  python scripts/bench_compression.py
echo "wrote $OUT" >&2
