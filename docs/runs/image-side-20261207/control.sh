set -e
cd /work/main
. .venv/bin/activate
A="--dataset busi --root ../shared/data/BUSI --folds 3 --split-file models/default_split.json --refiner-epochs 3 --device cpu --no-progress --output-dir /work/runs/side256 --init-from models/default.pt"
date -u
ultrarefiner train augment $A
date -u
ultrarefiner train refiner $A
date -u
