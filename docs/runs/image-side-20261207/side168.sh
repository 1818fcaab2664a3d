set -e
cd /work/main
. .venv/bin/activate
while pgrep -f "control.sh" > /dev/null; do sleep 20; done
A="--dataset busi --root ../shared/data/BUSI --folds 3 --split-file models/default_split.json --refiner-epochs 3 --device cpu --no-progress --output-dir /work/runs/side168 --init-from models/default.pt --image-side 168 --blend-guard none"
date -u
ultrarefiner train augment $A
date -u
ultrarefiner train refiner $A
date -u
