"""Fine-tuning that runs alone or under ``torchrun`` (DistributedDataParallel) unchanged.

Under ``torchrun --nproc_per_node=N`` the environment carries ``WORLD_SIZE``/``RANK``: the process group
is initialised (NCCL on GPUs, Gloo on CPU), the model is wrapped in DDP and the data sharded with a
DistributedSampler. Pruning masks are re-applied after every optimiser step, so pruned weights stay zero.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device):
    """Initialise the process group under ``torchrun`` (NCCL for a CUDA device, else Gloo); no-op alone."""
    if distributed() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")


def finetune(model: nn.Module, dataset, epochs: int, *, lr=0.01, batch_size=128, weight_decay=5e-4, masks=None,
             device="cpu", workers=2, seed=0, progress=False, max_steps=None) -> nn.Module:
    """SGD with momentum and a cosine schedule for ``epochs`` epochs; returns ``model`` (trained in
    place, left in eval mode). ``masks``: ``{weight name: keep mask}`` enforced after every step."""
    if epochs <= 0:
        return model.eval()
    init_distributed(device)
    model.to(device).train()
    net = nn.parallel.DistributedDataParallel(model) if distributed() else model
    sampler = torch.utils.data.DistributedSampler(dataset, seed=seed) if distributed() else None
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                         num_workers=workers, generator=gen, drop_last=True)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                          weight_decay=weight_decay)
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, total))
    bar = None
    if progress and (not distributed() or dist.get_rank() == 0):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="fine-tune", leave=False)
    step = 0
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:
            if step >= total:
                break
            x, y = x.to(device), torch.as_tensor(y).to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            sched.step()
            if masks:
                with torch.no_grad():
                    for name, m in masks.items():
                        params[name].mul_(m.to(params[name].device, params[name].dtype))
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    return model.eval()
