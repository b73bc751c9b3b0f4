"""The unstructured recipe end to end on a slice of the data: batch-norm re-estimation, invariant masks,
every observed deviation below its certified bound, the rank-agreement table."""
import json

from pathsaliency.recipes import unstructured


def test_unstructured_recipe_with_batchnorm_reestimation(tmp_path):
    config = unstructured.Config(data="sample", limit=10, sparsities=(0.5,), bn_images=16, progress=False,
                                 criteria=("magnitude", "balanced-fan", "balanced-fan (rescaled)"), out=str(tmp_path))
    rows = unstructured.run(config, log=lambda *a: None)
    assert json.loads((tmp_path / "unstructured.json").read_text()) == rows
    assert [r["criterion"] for r in rows] == list(config.criteria)
    for r in rows:
        assert r["bn_reestimated"] is True and r["exact"] is False  # new statistics: case 2, an upper bound
        assert 0 <= r["observed_max"] <= r["certified_bound"]
        assert 0 < r["D_relative_masks"] < 1 and r["D_relative"] > 0
    plain, rescaled = rows[1], rows[2]
    assert rescaled["same_masks_as_unrescaled"] is True and rescaled["top1"] == plain["top1"]
    assert "Spearman" in (tmp_path / "unstructured.md").read_text()
    assert (tmp_path / "unstructured.png").stat().st_size > 0


def test_without_reestimation_or_data_aware_criteria_no_training_image_is_read(tmp_path, monkeypatch):
    """The demo's path: only the packaged test images exist on a fresh machine."""
    def no_training_images(n):
        raise AssertionError("training images read")

    monkeypatch.setattr(unstructured, "bn_images", no_training_images)
    config = unstructured.Config(data="sample", limit=10, sparsities=(0.5,), reestimate_bn=False, progress=False,
                                 criteria=("magnitude", "norm-balanced-lamp"), out=str(tmp_path))
    rows = unstructured.run(config, log=lambda *a: None)
    assert [r["bn_reestimated"] for r in rows] == [False, False]
