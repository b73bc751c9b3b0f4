"""The report figure: every title lies inside the figure, however many layers the left panel shows."""
import dataclasses
import math

import pytest

from pathsaliency.report import LayerDistance, RobustnessReport

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pathsaliency.report_plot import report_figure  # noqa: E402


def _report(n_layers, huge=False):
    layers = [LayerDistance(name=f"layer{i // 7 + 1}.{i % 7}.conv{i % 2 + 1}", tensors=["w"], changed=10, numel=100,
                            log10_distance=(300.0 if huge else 3.0) + i, distance=math.inf if huge else 10.0 ** (3 + i),
                            exact=i % 2 == 0, relative=0.1) for i in range(n_layers)]
    return RobustnessReport(
        name="resnet152 (torchvision), nncf-int8 mixed precision, 1,000 images", input_shape=[3, 224, 224],
        num_samples=10, log10_path_norm=320.0, path_norm=math.inf, log10_distance=319.5,
        distance=math.inf if huge else 1e25, exact=False, relative_distance=0.31, input_bound=2.64,
        log10_certified_bound=319.9, certified_bound=math.inf if huge else 2.6e25, observed_max=12.3,
        observed_mean=5.1, observed_to_certified=1.234e-318, agreement=99.0, accuracy_reference=None,
        accuracy_compressed=None, activations_quantized=True, full_model=True, full_observed_max=44.0,
        full_observed_mean=20.0, full_agreement=98.0, full_accuracy=None, layers=layers)


@pytest.mark.parametrize("n_layers", [0, 2, 20, 60])
@pytest.mark.parametrize("huge", [False, True])
def test_titles_are_inside_the_figure(n_layers, huge):
    report = _report(n_layers, huge)
    if n_layers == 0:
        report = dataclasses.replace(report, layers=None)
    fig = report_figure(report)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig.bbox
        texts = [fig._suptitle] + [ax.title for ax in fig.axes]
        for text in texts:
            extent = text.get_window_extent(renderer)
            assert extent.x0 >= box.x0 and extent.x1 <= box.x1 and extent.y1 <= box.y1, text.get_text()
    finally:
        plt.close(fig)
