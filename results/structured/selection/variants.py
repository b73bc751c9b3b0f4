import sys, time, torch, torch_pruning as tp
torch.set_num_threads(1)
from pathsaliency.recipes import structured as S
from pathsaliency.recipes.common import reestimate_batchnorm, predict, top1
from pathsaliency.integrations.torch_pruning import NormBalancedImportance
model_name = sys.argv[1]; variants = sys.argv[2].split(","); targets = [float(t) for t in sys.argv[3].split(",")]
V = {
 "nb2": lambda: NormBalancedImportance(p=2),
 "nb1": lambda: NormBalancedImportance(p=1),
 "l2": lambda: tp.importance.MagnitudeImportance(p=2),
 "l1": lambda: tp.importance.MagnitudeImportance(p=1),
 "l2first": lambda: tp.importance.MagnitudeImportance(p=2, group_reduction="first"),
 "l1first": lambda: tp.importance.MagnitudeImportance(p=1, group_reduction="first"),
 "nb2sum": lambda: NormBalancedImportance(p=2, normalizer="sum"),
 "nb2max": lambda: NormBalancedImportance(p=2, normalizer="max"),
 "nb2none": lambda: NormBalancedImportance(p=2, normalizer=None),
 "nb2gmax": lambda: NormBalancedImportance(p=2, group_reduction="max"),
 "nb2bias": lambda: NormBalancedImportance(p=2, bias=True),
 "l2bias": lambda: tp.importance.MagnitudeImportance(p=2, bias=True),
 "l2gmax": lambda: tp.importance.MagnitudeImportance(p=2, group_reduction="max"),
 "l1gmax": lambda: tp.importance.MagnitudeImportance(p=1, group_reduction="max"),
 "nb1gmax": lambda: NormBalancedImportance(p=1, group_reduction="max"),
}
orig = S.make_importance
S.make_importance = lambda name, shape, scope="local": V[name]() if name in V else orig(name, shape, scope)
c = S.Config(data="test", progress=False, threads=1)
spec = S.load_spec(model_name, c, log=lambda *a: None)
X, Y = spec.data
for t in targets:
    for v in variants:
        t0 = time.time()
        p = S.prune_to_macs(spec, v, "global", t, c)
        re = reestimate_batchnorm(p.model, spec.bn_X)
        print(f"{model_name} {t} {v:10s} macs {p.macs_removed:.3f} top1 {top1(predict(re, X), Y):.2f} ({time.time()-t0:.0f}s)", flush=True)
