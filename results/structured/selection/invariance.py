# group-fisher / norm-balanced-max / l2 on the trained ResNet-32 through the recipe's pruner: masks of the model and of a
# power-of-two random_rescale of it (the same calibration batches), at the group-fisher 30 % ratio
import copy, torch
torch.set_num_threads(1)
from pathsaliency import random_rescale
from pathsaliency.recipes import structured as S
from pathsaliency.recipes.common import seed_everything
seed_everything(0)
c = S.Config(data="sample", progress=False, threads=1, reestimate_bn=False)
spec = S.load_spec("resnet32", c, log=lambda *a: None)
calib = S.calibration_batches(S.cifar10("train", augment=True, limit=10000), 4, 64)
resc = copy.copy(spec)
resc.model = random_rescale(spec.model, factors=(2.0 ** -5, 1, 128, 4096), generator=torch.Generator().manual_seed(1))
idx = {n: m for n, m in resc.model.named_modules()}
resc.frozen = [idx[n] for n, m in spec.model.named_modules() if any(m is f for f in spec.frozen)]
resc.ignored = [idx[n] for n, m in spec.model.named_modules() if any(m is f for f in spec.ignored)]
x = torch.randn(4, 3, 32, 32)
with torch.no_grad():
    print("function kept:", float((spec.model(x) - resc.model(x)).abs().max()))
for name in ("group-fisher", "norm-balanced-max", "taylor", "l2"):
    a = S.prune(spec, name, "global", 0.148, c, calib)[1]
    b = S.prune(resc, name, "global", 0.148, c, calib)[1]
    same = all(torch.equal(a.out[k], b.out[k]) for k in a.out) and all(torch.equal(a.inp[k], b.inp[k]) for k in a.inp)
    print(f"{name:18s} identical masks after random_rescale: {same}")
