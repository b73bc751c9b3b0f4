"""Exploratory invariant importances for explore.py (issue 10, ResNet-32 round). Not library code."""
import copy, weakref
import torch
import torch_pruning as tp
from pathsaliency.criteria import _per_input_channel, _without_batchnorm
from pathsaliency.lifting import lift
from pathsaliency.params import qualified
from pathsaliency.rescale import rescalable_channels
from pathsaliency.integrations.torch_pruning import NormBalancedImportance
from pathsaliency.integrations.torch_pruning._compat import graph_of, group_on_modules


def balanced_parameters(model, rho=1.0, shift=False):
    """Representative with |gamma_j'| = rho ||W_:j'|| (shift: sqrt(gamma'^2 + beta'^2) = rho ||W_:j'||)."""
    params = dict(model.named_parameters())
    channels = rescalable_channels(lift(model).plan)
    assert not _without_batchnorm(channels, params)
    rep = {n: p.detach().to(torch.float64).clone() for n, p in params.items()}
    for step, consumers in channels:
        g = params[qualified(step.bn, "weight")].detach().to(torch.float64)
        b = params[qualified(step.bn, "bias")].detach().to(torch.float64)
        gamma = (g * g + b * b).sqrt() if shift else g.abs()
        out_sq = torch.zeros_like(gamma)
        for s, flat in consumers:
            w = params[qualified(s.module, "weight")].detach().to(torch.float64)
            out_sq += _per_input_channel(s, w * w, flat, len(gamma))
        norm = out_sq.sqrt()
        # lam^2 = rho ||W|| / gamma: gamma lam = rho ||W|| / lam
        lam = (rho * norm / gamma).sqrt()
        for s, flat in consumers:
            name = qualified(s.module, "weight")
            s.scale_inputs(rep[name], 1.0 / lam, flat)
        for what in ("weight", "bias"):
            rep[qualified(step.bn, what)] *= lam
    return {n: rep[n].to(params[n].dtype) for n in params}


class RhoBalanced(NormBalancedImportance):
    def __init__(self, rho=1.0, shift=False, **kw):
        super().__init__(**kw)
        self.rho, self.shift = rho, shift

    def representative_modules(self, model):
        if self._model is None or self._model() is not model:
            rep = copy.deepcopy(model)
            balanced = balanced_parameters(model, self.rho, self.shift)
            with torch.no_grad():
                for name, p in rep.named_parameters():
                    p.copy_(balanced[name])
            reps = dict(rep.named_modules())
            self._modules = {m: reps[n] for n, m in model.named_modules()}
            self._model = weakref.ref(model)
        return self._modules


VARIANTS = {}
for r in (1.0, 0.5, 0.35, 0.25, 0.15):
    for red in ("mean", "max"):
        for sh in (False, True):
            VARIANTS[f"rho{r}{'s' if sh else ''}-{red}"] = (lambda r=r, red=red, sh=sh: RhoBalanced(rho=r, shift=sh, p=2, group_reduction=red))


# ---- data-aware: group Fisher (squared per-sample gate derivative) and group Taylor on the gates ----
import torch.nn as nn
from pathsaliency.models.cifar_resnet import ShortcutConv

CALIB = []  # set by explore.py: the recipe's Taylor calibration batches


class GateScores(tp.importance.Importance):
    """Per channel, per sample ``z = sum_hw a * dL/da`` at every batch-norm output (and the frozen shortcut
    conv outputs, counted with the bn2 of their block): the derivative of the loss w.r.t. a multiplicative
    gate on the channel's producers. ``fisher``: mean_n (sum over the group's producers of z)^2;
    ``taylor``: |sum_n ...|."""

    def __init__(self, kind="fisher", normalizer="mean"):
        self.kind, self.normalizer = kind, normalizer
        self._model, self._z = None, None

    def gates(self, model):
        if self._model is not None and self._model() is model:
            return self._z
        mods = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        extra = {}
        for blk in model.modules():
            sc = getattr(blk, "shortcut", None)
            if isinstance(sc, ShortcutConv):
                extra[blk.bn2] = sc.conv
                mods.append(sc.conv)
        outs, hooks = {}, []
        def hook(m, i, o):
            o.retain_grad(); outs.setdefault(m, []).append(o)
        for m in mods:
            hooks.append(m.register_forward_hook(hook))
        model.eval()
        z = {m: [] for m in mods}
        try:
            for x, y in CALIB:
                outs.clear()
                with torch.enable_grad():
                    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
                    loss.backward()
                for m in mods:
                    o = outs[m][0]
                    z[m].append((o.detach() * o.grad).sum((2, 3)).double())
        finally:
            for h in hooks:
                h.remove()
            model.zero_grad(set_to_none=True)
        z = {m: torch.cat(v) for m, v in z.items()}
        for bn, sc in extra.items():
            z[bn] = z[bn] + z[sc]
        self._model, self._z = weakref.ref(model), z
        return z

    @torch.no_grad()
    def __call__(self, group):
        DG = graph_of(group)
        z = self.gates(DG.model)
        n_root = len(group[0].idxs)
        total = None
        for item in group:
            dep, idxs = item.dep, item.idxs
            m = dep.target.module
            if m in z and isinstance(m, nn.modules.batchnorm._BatchNorm):
                t = z[m][:, list(idxs)]
                if total is None:
                    total = torch.zeros(t.shape[0], n_root, dtype=t.dtype)
                total[:, list(item.root_idxs)] += t
        if total is None:
            return None
        s = total.pow(2).mean(0) if self.kind == "fisher" else total.sum(0).abs()
        if self.normalizer == "mean":
            s = s / s.mean().clamp_min(1e-300)
        return s.float()


VARIANTS["fisher"] = lambda: GateScores("fisher", "mean")
VARIANTS["fisher-raw"] = lambda: GateScores("fisher", None)
VARIANTS["gtaylor"] = lambda: GateScores("taylor", "mean")
VARIANTS["gtaylor-raw"] = lambda: GateScores("taylor", None)


# ---- data-free: unit post-activation RMS representative (Gaussian model of the batch-norm output) ----
def rms_parameters(model):
    """Every rescalable channel j scaled so that E[relu(gamma_j' z + beta_j')^2] = 1 for z ~ N(0, 1) (the
    batch-norm's normalised input): lam_j = 1 / RMS_j, RMS_j = |gamma_j| sqrt(g(beta_j / |gamma_j|)),
    g(t) = (1 + t^2) Phi(t) + t phi(t); consumers' columns times RMS_j. Invariant: RMS_j scales with the
    channel's rescaling factor, beta/|gamma| does not change."""
    params = dict(model.named_parameters())
    channels = rescalable_channels(lift(model).plan)
    rep = {n: p.detach().to(torch.float64).clone() for n, p in params.items()}
    for step, consumers in channels:
        g = params[qualified(step.bn, "weight")].detach().to(torch.float64)
        b = params[qualified(step.bn, "bias")].detach().to(torch.float64)
        a = g.abs()
        t = b / a.clamp_min(1e-300)
        phi = torch.exp(-0.5 * t * t) / (2 * torch.pi) ** 0.5
        gt = (1 + t * t) * torch.special.ndtr(t) + t * phi
        rms = torch.where(a > 0, a * gt.clamp_min(0).sqrt(), b.clamp_min(0))
        lam = torch.where(rms > 0, 1.0 / rms.clamp_min(1e-300), torch.zeros_like(rms))
        for s, flat in consumers:
            s.scale_inputs(rep[qualified(s.module, "weight")], rms, flat)
        for what in ("weight", "bias"):
            rep[qualified(step.bn, what)] *= lam
    return {n: rep[n].to(params[n].dtype) for n in params}


class RmsBalanced(RhoBalanced):
    def representative_modules(self, model):
        if self._model is None or self._model() is not model:
            rep = copy.deepcopy(model)
            balanced = rms_parameters(model)
            with torch.no_grad():
                for name, p in rep.named_parameters():
                    p.copy_(balanced[name])
            reps = dict(rep.named_modules())
            self._modules = {m: reps[n] for n, m in model.named_modules()}
            self._model = weakref.ref(model)
        return self._modules


for red in ("mean", "max"):
    for p in (1, 2):
        VARIANTS[f"rms-p{p}-{red}"] = (lambda red=red, p=p: RmsBalanced(p=p, group_reduction=red))
