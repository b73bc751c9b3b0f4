import sys, copy, torch, pathsaliency as ps
torch.set_num_threads(1)
from pathsaliency.criteria import invariant_scores, lamp
from pathsaliency.lifting import lift
from pathsaliency.saliency import _step_of
from pathsaliency.pruning import prunable_weights, unstructured_scores, masks_from_scores, apply_masks
from pathsaliency.models.cifar_resnet import load_cifar_resnet
from pathsaliency.recipes.common import reestimate_batchnorm, predict, top1, as_tensors
from pathsaliency.recipes.cifar10 import cifar10
from pathsaliency.recipes.unstructured import load_data
X, Y = load_data("sample")
Xt, _ = as_tensors(cifar10("train", limit=1024))
m = load_cifar_resnet(sys.argv[1] if len(sys.argv) > 1 else "resnet20")
names = prunable_weights(m)

def activation_scores(model, names, X):
    lifted = lift(model)
    cp = copy.deepcopy(model).eval()
    mods = dict(cp.named_modules())
    xin, yout, hooks = {}, {}, []
    def rms(t, key, store):
        d = t.detach().double()
        dims = [0] + list(range(2, d.dim()))
        store[key] = store.get(key, 0) + (d * d).sum(dims)
    for n in names:
        mn = n.rpartition(".")[0]
        st = _step_of(lifted, mn)
        hooks.append(mods[mn].register_forward_hook(lambda mod, a, o, k=n: rms(a[0], k, xin)))
        hooks.append(mods[st.bn or mn].register_forward_hook(lambda mod, a, o, k=n: rms(o, k, yout)))
    with torch.no_grad():
        for i in range(0, len(X), 256):
            cp(X[i:i+256])
    out = {}
    for n in names:
        w = dict(model.named_parameters())[n].detach().abs().double()
        xi, yo = xin[n].sqrt(), yout[n].sqrt()
        sh = (-1,) + (1,) * (w.dim() - 1)
        shi = (1, -1) + (1,) * (w.dim() - 2)
        # folded weight: |s_i W| ; y after bn. use raw W * |s| via bn
        st = _step_of(lifted, n.rpartition(".")[0])
        s = torch.ones(w.shape[0], dtype=torch.float64)
        if st.bn:
            bn = mods[st.bn]; s = (bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt()).abs()
        out[n] = w * s.view(sh) * xi.view(shi) / yo.view(sh)
    return out

bal = invariant_scores(m, (3,32,32), "balanced", names)
def fan(n, t):
    mod = m.get_submodule(n.rpartition(".")[0]); w = mod.weight
    return w[0].numel()
crits = {
 "balanced-fan": {n: s * (s.shape[0] * s[0,0].numel()) ** 0.5 for n, s in bal.items()},
 "balanced-he": {n: s / s.pow(2).mean().sqrt() / fan(n, s) ** 0.5 for n, s in bal.items()},
 "activation": activation_scores(m, names, Xt),
}
crits["activation-lamp"] = {n: lamp(s) for n, s in crits["activation"].items()}
for c, s in crits.items():
    line = []
    for sp in (0.4, 0.6, 0.7, 0.8):
        p = apply_masks(m, masks_from_scores(s, sp))
        b = top1(predict(reestimate_batchnorm(p, Xt), X), Y)
        line.append(f"{sp:.0%}: {b:5.1f}")
    print(f"{c:16s}", "  ".join(line), flush=True)
