import sys, time, json, warnings, numpy as np, onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
sys.path.insert(0, "/work/main")
from training.data.datasets import load_image
from training.data.transforms import refiner_input
root="/work/main/../shared/data/BUSI/Dataset_BUSI_with_GT/"
d=json.load(open("/work/main/models/default_split.json"))
vals=[refiner_input(load_image(root+i.split(" ")[0]+"/"+i+".png"),"litemedsam")[0][None].numpy() for i in sorted(d["folds"][0])[:12]]
C="/work/main/var/cache/onnx/encoder-256-720b66ceadee5bce.onnx"
def s(p):
    o=ort.SessionOptions(); o.intra_op_num_threads=2; o.inter_op_num_threads=1; o.log_severity_level=3
    o.graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.add_session_config_entry("session.intra_op.allow_spinning","0")
    return ort.InferenceSession(p,o,providers=["CPUExecutionProvider"])
ref=s(C); refout=[ref.run(None,{"images" if False else ref.get_inputs()[0].name:v})[0].ravel() for v in vals]
variants={"s8 (shipped)":dict(weight_type=QuantType.QInt8),"s8 reduce_range":dict(weight_type=QuantType.QInt8,reduce_range=True),
 "u8u8":dict(weight_type=QuantType.QUInt8),"s8 per_channel":dict(weight_type=QuantType.QInt8,per_channel=True),
 "s8 per_channel reduce_range":dict(weight_type=QuantType.QInt8,per_channel=True,reduce_range=True)}
for name,kw in variants.items():
    out=f"/tmp/prof/q_{name.replace(' ','_').replace('(','').replace(')','')}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); quantize_dynamic(C,out,op_types_to_quantize=["MatMul"],**kw)
    q=s(out); n=q.get_inputs()[0].name
    cos=[];rel=[]
    for v,x in zip(vals,refout):
        y=q.run(None,{n:v})[0].ravel(); cos.append(x@y/np.linalg.norm(x)/np.linalg.norm(y)); rel.append(np.linalg.norm(x-y)/np.linalg.norm(x))
    for _ in range(2): q.run(None,{n:vals[0]})
    ts=[]
    for v in vals:
        t=time.perf_counter(); q.run(None,{n:v}); ts.append((time.perf_counter()-t)*1000)
    print(json.dumps({"variant":name,"cos_mean":round(float(np.mean(cos)),4),"rel_mean":round(float(np.mean(rel)),4),"p50_ms":round(float(np.median(ts)),1),"min_ms":round(min(ts),1)}),flush=True)
