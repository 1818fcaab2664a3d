"""The encoder crop graphs of scale_probe.py on OpenVINO bf16, 2 threads, random input; prints JSON.

Run after scale_probe.py has cached the 224×224 and 168×168 graphs in var/cache/onnx. The three
graphs are timed interleaved (median of 15 after 3 warm-up calls), so the VM's drift hits each alike.

    python docs/runs/scale-probe-20261207/timing.py > timing.json
"""

import glob
import json
import statistics
import time

import numpy as np

from backend.app.engines.openvino_engine import OpenVinoSession
from training.machine import describe

shapes = {"224x256": (224, 256), "224x224": (224, 224), "168x168": (168, 168)}
paths = {
    "224x256": glob.glob("var/cache/onnx/encoder-224x256-*.onnx")[0],
    "224x224": glob.glob("var/cache/onnx/encoder-224-*.onnx")[0],
    "168x168": glob.glob("var/cache/onnx/encoder-168-*.onnx")[0],
}
sessions = {k: OpenVinoSession(p, 2, bf16=True) for k, p in paths.items()}
feeds = {
    k: {s.get_inputs()[0].name: np.random.rand(1, 3, *shapes[k]).astype(np.float32)}
    for k, s in sessions.items()
}
times = {k: [] for k in sessions}
for k, s in sessions.items():
    for _ in range(3):
        s.run(None, feeds[k])
for _ in range(15):  # interleaved, so the VM's drift hits every shape alike
    for k, s in sessions.items():
        a = time.perf_counter()
        s.run(None, feeds[k])
        times[k].append(1000 * (time.perf_counter() - a))
print(
    json.dumps(
        {
            "machine": describe(),
            "engine": "openvino-bf16",
            "threads": 2,
            "median_ms": {k: round(statistics.median(v), 1) for k, v in times.items()},
        },
        indent=1,
    )
)
