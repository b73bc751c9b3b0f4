"""Exact group scores sharded over ``torch.distributed`` ranks: the same numbers as one process.

The candidates of a removal pass (:func:`pathsaliency.channel_saliency`, MATH.md section 6) are
independent: candidate ``j`` is batch element ``j`` of its own pass. One process cuts them into chunks
whose size depends only on the number of candidates and the memory budget; :func:`map_chunks` keeps
exactly those chunks, lets rank ``r`` of ``R`` compute chunks ``r, r + R, r + 2R, ...`` and all-gathers
the results. Each score is therefore produced by the same operations on the same batch as in one
process, and every rank returns the whole vector, bit for bit what one process returns (with the same
number of threads per process: a CPU kernel may sum in a different order on another thread count).
Where there are fewer chunks than ranks, some ranks idle: a smaller ``memory_budget`` makes more chunks
(and gives the same scores on one process as on many).

Under ``torchrun`` (Gloo on CPU, NCCL on GPU, with each rank's model on its own device) pass
``shard="auto"``. The calls are collective: every rank of the group must make the same calls with the
same model and arguments; ranks that disagree on the number of candidates or chunks get an error.

Per-weight scores (:func:`pathsaliency.path_magnitude`) are not sharded: they are one forward and one
backward pass that every weight shares; splitting that pass (by outputs, or by layers) would change the
order of floating-point sums, so no split gives the one-process numbers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import PathSaliencyError


def process_group(shard):
    """The process group that ``shard`` selects, or None for one process.

    ``None`` / ``False``: one process. ``"auto"``: the default group when ``torch.distributed`` is
    initialised with more than one rank, else one process. A ``ProcessGroup``: that group.
    """
    if shard is None or shard is False:
        return None
    if isinstance(shard, str):
        if shard != "auto":
            raise ValueError(f"shard must be None, 'auto' or a torch.distributed process group, got {shard!r}")
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return dist.group.WORLD
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard is a process group but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (or pass shard=None)")
    return shard


def map_chunks(fn, slices, *, device, shard=None) -> torch.Tensor:
    """``torch.cat([fn(s) for s in slices])``, the chunks dealt to the ranks of ``shard``.

    ``fn(s)`` returns a float64 tensor of ``s.stop - s.start`` values for the candidates of slice ``s``
    (contiguous slices in order, covering ``0..total``), computed on ``device``; the result is on
    ``device`` on every rank.
    """
    group = process_group(shard)
    if group is None:
        parts = [fn(s) for s in slices]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
        else torch.device("cpu")
    total = slices[-1].stop if slices else 0
    _check_agree(torch.tensor([total, len(slices)], device=comm), group, world)
    local = torch.zeros(total, dtype=torch.float64, device=comm)
    owner = torch.empty(total, dtype=torch.long)
    for i, s in enumerate(slices):
        owner[s] = i % world
        if i % world == rank:
            local[s] = fn(s).to(comm)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    return torch.stack(gathered)[owner.to(comm), torch.arange(total, device=comm)].to(device)


def _check_agree(mine: torch.Tensor, group, world):
    seen = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(seen, mine, group=group)
    if any(not torch.equal(s, seen[0]) for s in seen):
        sizes = ", ".join(f"rank {r}: {int(s[0])} candidates in {int(s[1])} chunks" for r, s in enumerate(seen))
        raise PathSaliencyError(f"the ranks of a sharded channel_saliency call disagree ({sizes}): every rank "
                                "must make the same call with the same model, removals and memory_budget")
