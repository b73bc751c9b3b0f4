"""pathsaliency: the l1 path-metric of ReLU networks, for compression tools.

For a ReLU network (convolutions, skips, pooling, frozen batch-norm) and two parameter vectors,
``||R_theta(x) - R_theta'(x)||_1 <= max(1, ||x||_inf) * D(theta, theta')`` where ``D`` is the l1
path-metric, computed here with a few forward passes of the network with absolute weights.
"""
from .compressed import CompressedModelError
from .errors import ArchitectureMismatchError, PathSaliencyError, UnsupportedModelError
from .metric import PathMetric, layer_distances, lipschitz_bound, path_metric
from .norm import PathValue, path_norm
from .pruning import prune_unstructured
from .rescale import random_rescale
from .report import RobustnessReport, robustness_report
from .saliency import Removal, Scores, channel_saliency, path_magnitude
from .theta import Theta

__all__ = [
    "path_norm", "path_metric", "layer_distances", "lipschitz_bound", "PathValue", "PathMetric",
    "random_rescale", "path_magnitude", "prune_unstructured", "channel_saliency", "Removal", "Scores",
    "PathSaliencyError", "UnsupportedModelError", "ArchitectureMismatchError", "CompressedModelError",
    "robustness_report", "RobustnessReport", "Theta",
]
__version__ = "0.1.0"
