"""Exploration of invariant structured importances on ResNet-20/32 (issue 10, ResNet-32 round).

    PYTHONPATH=src nice -n 10 python results/structured/selection/explore.py MODEL IMPS TARGETS [BNSETS] [EVAL]

MODEL resnet20|resnet32; IMPS comma-separated names (the recipe's IMPORTANCES or the variants below);
TARGETS comma-separated MACs fractions; BNSETS comma-separated indices k of the 1,024-image batch-norm
re-estimation sets (training images [1024k, 1024(k+1)) of the class-balanced order; 0 is the recipe's);
EVAL: val (training images 45,000-49,999, never used for re-estimation, calibration or fine-tuning:
the selection set), test (the 10,000 test images) or val+test. Pruning is the recipe's prune_to_macs
(global MetaPruner, bisection on the MACs actually removed), top-1 % after the re-estimation.
"""
import sys, time, torch
torch.set_num_threads(1)
import torch_pruning as tp
from pathsaliency.recipes import structured as S
from pathsaliency.recipes.common import reestimate_batchnorm, predict, top1
from pathsaliency.recipes.cifar10 import cifar10
from pathsaliency.recipes.common import as_tensors

model_name = sys.argv[1]; names = sys.argv[2].split(","); targets = [float(t) for t in sys.argv[3].split(",")]
bnsets = [int(k) for k in sys.argv[4].split(",")] if len(sys.argv) > 4 else [0]
evals = sys.argv[5].split("+") if len(sys.argv) > 5 else ["val"]

V = {}
try:
    from variants_extra import VARIANTS  # exploratory importances (same folder)
    V.update(VARIANTS)
except ImportError:
    pass
orig = S.make_importance
S.make_importance = lambda name, shape, scope="local", calib=(): V[name]() if name in V else orig(name, shape, scope, calib)

c = S.Config(data="test", progress=False, threads=1)
from pathsaliency.recipes.common import seed_everything
import os
seed_everything(int(os.environ.get("CALIB_SEED", "0")))  # as the recipe's run(): the same augmented calibration batches
spec = S.load_spec(model_name, c, log=lambda *a: None)
tr = cifar10("train")
need = 1024 * (max(bnsets) + 1)
Xb = as_tensors(torch.utils.data.Subset(tr, range(need)))[0]
sets = {"test": spec.data}
if "val" in evals:
    sets["val"] = as_tensors(torch.utils.data.Subset(tr, range(45000, 50000)))
calib = S.calibration_batches(spec.train_data, c.calib_batches, c.calib_batch_size) \
    if any(n == "taylor" or n.startswith(("fisher", "gtaylor")) for n in names) else []
try:
    import variants_extra
    variants_extra.CALIB[:] = calib
except ImportError:
    pass
for t in targets:
    for v in names:
        t0 = time.time()
        p = S.prune_to_macs(spec, v, "global", t, c, calib)
        accs = []
        for k in bnsets:
            re = reestimate_batchnorm(p.model, Xb[1024 * k:1024 * (k + 1)])
            for e in evals:
                X, Y = sets[e]
                accs.append(f"{e}{k} {top1(predict(re, X), Y):.2f}")
        print(f"{model_name} {t} {v:18s} ratio {p.ratio:.4f} macs {p.macs_removed:.4f} " + " ".join(accs)
              + f" ({time.time()-t0:.0f}s)", flush=True)
