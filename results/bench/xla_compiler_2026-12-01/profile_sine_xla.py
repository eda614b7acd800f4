"""Per-kernel XLA trace of bench/meta_step.py's sine second-order step (see notes.md)."""
import sys, os, glob, tempfile, collections
sys.path.insert(0, "bench")  # run from the repository root
import meta_step as ms
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2
step, ep, _ = ms.build("sine", "second", True, steps_per_call=1)
for _ in range(20): step(ep)
d = tempfile.mkdtemp()
tf.profiler.experimental.start(d)
for _ in range(50): step(ep).numpy()
tf.profiler.experimental.stop()
path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
sp = xplane_pb2.XSpace(); sp.ParseFromString(open(path,"rb").read())
agg = collections.Counter(); cnt = collections.Counter()
for p in sp.planes:
    for line in p.lines:
        for e in line.events:
            n = p.event_metadata[e.metadata_id].name
            agg[(p.name, line.name, n)] += e.duration_ps/1e6/50; cnt[(p.name,line.name,n)] += 1
for k, v in agg.most_common(45):
    print(f"{v:8.2f} us  x{cnt[k]/50:5.1f}  {k}")
tot = collections.Counter()
for (pl, ln, n), v in agg.items():
    if "Eigen" in ln or (ln == "python" and ("fusion" in n or n.startswith(("MatMul", "dot", "copy", "wrapped")))):
        if n == "ThunkExecutor::Execute": continue
        tot["dot" if n.startswith(("MatMul", "dot")) else "other"] += v
        tot["n_" + ("dot" if n.startswith(("MatMul", "dot")) else "other")] += cnt[(pl, ln, n)] / 50
print("SUMMARY", dict(tot))
