"""The served coarse and 224×256 crop encoder graphs on OpenVINO bf16 with 1 and 2 threads (ad hoc).

Run after a server has cached the graphs in var/cache/onnx; random input, median of 10 after 3
warm-up calls. The output of the recorded run is thread_scaling.txt.

    python docs/runs/encoder-crop-zen4-20261207/thread_scaling.py
"""

import glob
import statistics
import time

import numpy as np

from backend.app.engines.openvino_engine import OpenVinoSession

for path, shape in [
    (glob.glob("var/cache/onnx/coarse-112-*.onnx")[0], [1, 1, 112, 112]),
    (glob.glob("var/cache/onnx/encoder-224x256-*.onnx")[0], [1, 3, 224, 256]),
]:
    for th in (1, 2):
        s = OpenVinoSession(path, th, bf16=True)
        feed = {s.get_inputs()[0].name: np.random.rand(*shape).astype(np.float32)}
        for _ in range(3):
            s.run(None, feed)
        t = []
        for _ in range(10):
            a = time.perf_counter()
            s.run(None, feed)
            t.append(1000 * (time.perf_counter() - a))
        print(path.split("/")[-1], th, round(statistics.median(t), 1), flush=True)
