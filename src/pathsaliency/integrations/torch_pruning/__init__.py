"""torch-pruning (tested with 1.6) adapter: the exact, rescaling-invariant path-metric inside ``MetaPruner``.

::

    import torch_pruning as tp
    from pathsaliency.integrations.torch_pruning import PathMetricImportance

    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=PathMetricImportance(shape),
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()

``NormBalancedImportance`` is torch-pruning's own magnitude importance read on the norm-balanced
representative of the rescaling orbit (rescaling-invariant by construction); ``GroupFisherImportance``
the data-aware, invariant mean square over calibration samples of the loss's derivative with respect to
a gate on each channel (torch-pruning's own ``TaylorImportance`` is invariant too).

One job per module: ``importance`` (the host contract), ``norm_balanced`` (the invariant magnitude),
``model_state`` (whether a cache still matches the model's parameters),
``fisher`` (the invariant group Fisher),
``groups`` (a group as core ``Removal`` items), ``input_shape`` (read from the graph's trace), ``frozen`` (layers whose channels follow their groups),
``tracker`` (which original channels survive) and ``certificate`` (the certified distance of the
physically pruned model); every torch-pruning internal is read in ``_compat``.
"""
from __future__ import annotations

try:
    import torch_pruning  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without torch-pruning
    raise ImportError("pathsaliency.integrations.torch_pruning needs torch-pruning: "
                      "pip install 'pathsaliency[torch-pruning]'") from e

from .certificate import certify_pruned
from .fisher import GroupFisherImportance
from .frozen import FrozenFollowingPruner
from .groups import channel_groups, group_removals
from .importance import PathMetricImportance, normalized_scores, sequential_scores
from .input_shape import input_shape_from_graph
from .norm_balanced import NormBalancedImportance
from .tracker import ChannelTracker

__all__ = ["PathMetricImportance", "NormBalancedImportance", "GroupFisherImportance", "sequential_scores", "normalized_scores", "group_removals", "channel_groups",
           "input_shape_from_graph", "FrozenFollowingPruner", "ChannelTracker", "certify_pruned"]
