"""Why does every_k (LookSAM) lose accuracy? One MNIST-1D run with instruments on the stored g_v.

At every full step it records ||g|| (first pass), ||g_s|| (second pass), ||g_v|| split by parameter kind
(weights, norm/bias, quantizer steps), the cosine between this g_v and the previous full step's g_v (with
strategy_k=1: adjacent iterations, different batches) and prints one JSON line with the accuracy and the means
over the first 10 and the second half of the full steps. ALPHA=auto|<float> in the environment sets alpha.

    ALPHA=0.7  python benchmarks/every_k_probe.py '{"w_bits":32,"a_bits":32,"first_last_bits":32,"sharpness":"sam"}'
    ALPHA=auto python benchmarks/every_k_probe.py '{"strategy_k":1}'     # w2a2 case 3, g_v every step

Results of the runs quoted in the README: benchmarks/results/every_k_probe.jsonl.
"""
import sys, json, time, torch
torch.set_num_threads(1)
from saq.config import TrainConfig
from saq.train import train
from saq import sam as S
from saq.quantizer import LSQQuantizer

stats = []
orig = S.SAQ._update_gv
def patched(self, g_first):
    params = self._params()
    kinds = getattr(self, "_kinds", None)
    if kinds is None:
        kinds = {}
        for m in self._model.modules() if hasattr(self, "_model") else []:
            pass
    gf = [g.clone() if g is not None else None for g in g_first]
    gs = [p.grad.clone() if p.grad is not None else None for p in params]
    old = None if self._gv is None else [None if t is None else t.clone() for t in self._gv]
    orig(self, g_first)
    gv = self._gv
    def n(ts): return float(torch.sqrt(sum((t.double()**2).sum() for t in ts if t is not None)))
    rec = {"g": n(gf), "gs": n(gs), "gv": n(gv)}
    for kind, idx in self._kind_idx.items():
        rec["gv_" + kind] = n([gv[i] for i in idx]); rec["g_" + kind] = n([gf[i] for i in idx])
    if old is not None:
        num = sum(float((a.double()*b.double()).sum()) for a, b in zip(old, gv) if a is not None and b is not None)
        rec["cos_gv_prev"] = num / (n(old) * n(gv) + 1e-30)
        # cosine of g (plain grads) with the stored g_v of the previous full step: is g_v still orthogonal to g?
        rec["cos_g_oldgv"] = sum(float((a.double()*b.double()).sum()) for a, b in zip(old, gf) if a is not None and b is not None) / (n(old)*n(gf)+1e-30)
    self._last_gf = gf
    stats.append(rec)
S.SAQ._update_gv = patched
orig_init = S.SAQ.__init__
import os
def init(self, model, base, *a, **k):
    if os.environ.get("ALPHA"):
        k["alpha"] = "auto" if os.environ["ALPHA"] == "auto" else float(os.environ["ALPHA"])
    orig_init(self, model, base, *a, **k)
    ids = {}
    for mn, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            kind = "step" if isinstance(m, LSQQuantizer) else ("w" if p.ndim > 1 else "norm_bias")
            ids[id(p)] = kind
    self._kind_idx = {}
    for i, p in enumerate(self._params()):
        self._kind_idx.setdefault(ids.get(id(p), "other"), []).append(i)
S.SAQ.__init__ = init

over = json.loads(sys.argv[1])
cfg = dict(dataset="mnist1d", model="cnn1d", epochs=10, batch_size=128, lr=0.05, weight_decay=5e-4, save=False,
           w_bits=2, a_bits=2, first_last_bits=8, sharpness="case3", strategy="every_k", rho=0.05)
cfg.update(over)
t0 = time.time()
res = train(TrainConfig(**cfg), progress=False)
import statistics as st
summ = {}
if stats:
    for key in sorted({k for s in stats for k in s}):
        vals = [s[key] for s in stats if key in s]
        summ[key] = [round(st.mean(vals[:10]), 4), round(st.mean(vals[len(vals)//2:]), 4)]
print(json.dumps({"over": over, "alpha": os.environ.get("ALPHA", "default"), "test_acc": res["test_acc"], "t": round(time.time()-t0,1), "stats(first10,secondhalf)": summ}))
