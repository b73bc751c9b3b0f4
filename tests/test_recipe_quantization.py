"""The quantization recipe end to end on ResNet-20 and a slice of the packaged CIFAR-10 sample (no shared
data needed): files, observed <= certified for the weights-only model, the full model kept apart, and
JSON round trips."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("nncf")
pytest.importorskip("neural_compressor.torch")
pytest.importorskip("matplotlib")

from pathsaliency.recipes import quantization  # noqa: E402
from pathsaliency.report import RobustnessReport  # noqa: E402

ARGS = ["--data", "sample", "--limit", "24", "--calibration-data", "sample", "--calibration-size", "8",
        "--no-per-layer", "--no-progress", "--seed", "0"]


def _check_run(out, methods, tags):
    """``tags``: ``{sparsity: report folder prefix}`` of the configurations run, in order."""
    for stem in ("csv", "md", "json", "png"):
        assert (out / f"quantization.{stem}").is_file()
    rows = json.loads((out / "quantization.json").read_text())
    assert [(r["sparsity"], r["method"]) for r in rows] == [(sp, m) for sp in tags for m in methods]
    assert (out / "quantization.md").read_text().count("\n| resnet20 |") == len(rows)
    assert "NOT certified" in (out / "quantization.md").read_text()
    assert (out / "quantization.csv").read_text().splitlines()[0].split(",") == quantization.COLUMNS
    for row in rows:
        tag = tags[row["sparsity"]]
        rdir = out / f"{tag}-{row['method']}"
        for name in ("report.json", "report.md", "report.png"):
            assert (rdir / name).is_file(), rdir / name
        text = (rdir / "report.json").read_text()
        report = RobustnessReport.from_json(text)
        assert report.to_json() == text  # exact round trip
        assert report.num_samples == 24 and report.input_shape == [3, 32, 32]
        # the certificate holds for the weights-only model (the report checked every image, too)
        assert 0 < report.distance and 0 < report.observed_max <= report.certified_bound
        assert row["observed_max"] == report.observed_max
        assert math.isclose(row["log10_certified_bound"], math.log10(report.certified_bound), rel_tol=1e-9)
        assert row["log10_D"] == report.log10_distance and row["exact"] is False  # quantization: case 2
        assert 0 < row["D_relative"] < 1
        for key in ("top1_reference", "top1_full", "top1_weights_only"):
            assert 0 <= row[key] <= 100
        assert row["full_observed_max"] is not None and report.full_model
        md = (rdir / "report.md").read_text()
        if row["method"] in quantization.ACTIVATIONS_QUANTIZED:
            assert row["activations_quantized"] is True and report.activations_quantized
            assert "NOT certified" in md and "Not certified" in md
            assert row["calibration"].startswith("STAND-IN: packaged sample, 8 test images")
        else:  # weight-only: no activation quantization: the full model is the weights-only model
            assert row["activations_quantized"] is False and not report.activations_quantized
            if row["method"].startswith("inc-rtn"):  # RTN: Linear only (640 of ResNet-20's 268,336 weights)
                assert "Linear layers only" in row["quantized"]
                assert row["quantized_weights"] == pytest.approx(640 / 268336)
            else:  # NNCF compress_weights: every conv and linear weight
                assert row["quantized_weights"] == 1.0
            assert math.isclose(row["full_observed_max"], row["observed_max"], rel_tol=1e-4, abs_tol=1e-5)
    return rows


def test_quantization_recipe_nncf_and_rtn(tmp_path):
    out = tmp_path / "q"
    quantization.main(ARGS + ["--methods", "nncf-int8", "inc-rtn-w8", "--prune-sparsity", "0.4", "--out", str(out)])
    rows = _check_run(out, ["nncf-int8", "inc-rtn-w8"], {0.4: "resnet20-pruned40"})
    assert rows[0]["top1_reference"] == rows[1]["top1_reference"]  # one float reference: the pruned network
    assert rows[0]["log10_path_norm"] == rows[1]["log10_path_norm"]


@pytest.mark.slow
def test_quantization_recipe_inc_static(tmp_path):
    out = tmp_path / "q"
    quantization.main(ARGS + ["--methods", "inc-static-int8", "--out", str(out)])
    _check_run(out, ["inc-static-int8"], {0.0: "resnet20"})


@pytest.mark.slow
def test_quantization_recipe_nncf_weight_only_and_mixed(tmp_path):
    out = tmp_path / "q"
    methods = ["nncf-w8", "nncf-w4", "nncf-int8-mixed"]
    quantization.main(ARGS + ["--methods", *methods, "--mixed-size", "0.4", "--out", str(out)])
    rows = _check_run(out, methods, {0.0: "resnet20"})
    w8, w4, mixed = rows
    assert w8["D_relative"] < w4["D_relative"]  # INT4 on the linear layer moves more than INT8
    assert mixed["float_layers"] and 0 < mixed["quantized_weights"] < 1
    assert w8["float_layers"] == w4["float_layers"] == ""


def test_quantization_recipe_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        quantization.run(quantization.Config(methods=("fp8",), out=tmp_path))
    with pytest.raises(ValueError, match="sparsity"):
        quantization.run(quantization.Config(methods=("inc-rtn-w8",), prune_sparsity=(1.0,), out=tmp_path))
    with pytest.raises(SystemExit) as exc:
        quantization.main(["--help"])
    assert exc.value.code == 0
