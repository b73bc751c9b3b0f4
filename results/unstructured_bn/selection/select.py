import sys, time, json, torch, pathsaliency as ps
torch.set_num_threads(1)
from pathsaliency.criteria import invariant_scores, lamp
from pathsaliency.pruning import prunable_weights, unstructured_scores, masks_from_scores, apply_masks
from pathsaliency.models.cifar_resnet import load_cifar_resnet
from pathsaliency.recipes.common import reestimate_batchnorm, predict, top1, as_tensors
from pathsaliency.recipes.cifar10 import cifar10
from pathsaliency.recipes.unstructured import load_data
X, Y = load_data("sample")
Xt, _ = as_tensors(cifar10("train", limit=1024))
m = load_cifar_resnet(sys.argv[1] if len(sys.argv) > 1 else "resnet20")
names = prunable_weights(m)
mag = unstructured_scores(m, None, "magnitude", names)
crits = {"magnitude": mag, "magnitude-lamp": {n: lamp(s) for n, s in mag.items()},
         "path-magnitude": unstructured_scores(m, (3,32,32), "path-magnitude", names)}
for c in ("balanced", "balanced-lamp", "path-lamp"):
    crits[c] = invariant_scores(m, (3,32,32), c, names)
print("ref", top1(predict(m, X), Y), flush=True)
res = {}
for c, s in crits.items():
    line = []
    for sp in (0.4, 0.6, 0.7, 0.8):
        p = apply_masks(m, masks_from_scores(s, sp))
        a = top1(predict(p, X), Y); b = top1(predict(reestimate_batchnorm(p, Xt), X), Y)
        res[(c, sp)] = (a, b); line.append(f"{sp:.0%}: {a:5.1f}/{b:5.1f}")
    print(f"{c:16s}", "  ".join(line), flush=True)
