"""``agentreg evaluate`` measures Dice in two spaces (issue 30): on the model grid (the paper's protocol) and in the
fixed image's own space, the figure a user checks with their own tools on the warped label it writes.

One real 3-D PROMISE12 validation pair, crops on the organ, plain elastix with few iterations: the fixed-space Dice of
the table must be the Dice plain SimpleITK computes from the written warped label and the fixed label file.
"""

from __future__ import annotations

import csv

import pytest
import SimpleITK as sitk
from AgentRegistrationLib.cli import main

PAIR = ("case09", "case02")  # moving, fixed: two validation subjects
METHODS = ("none", "localised", "e8")


@pytest.fixture(scope="module")
def evaluation(grid128, tmp_path_factory):
    out = tmp_path_factory.mktemp("spaces")
    argv = ["evaluate", "--data", grid128, "--dim", "3", "--crop", "organ", "--methods", ",".join(METHODS),
            "--pairs", ":".join(PAIR), "--workers", "1", "--iterations", "10", "--out", out]
    assert main([str(a) for a in argv]) == 0
    with (out / "evaluation.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    return {"out": out, "rows": rows, "report": (out / "evaluation.md").read_text()}


def _dice_in_plain_simpleitk(fixed_label, warped_label) -> float:
    measure = sitk.LabelOverlapMeasuresImageFilter()
    measure.Execute(sitk.Cast(fixed_label > 0, sitk.sitkUInt8), sitk.Cast(warped_label > 0, sitk.sitkUInt8))
    return measure.GetDiceCoefficient()


def test_the_table_has_dice_in_both_spaces_and_says_which_is_which(evaluation):
    report = evaluation["report"]
    assert "| DICE Med. |" in report and "| DICE Med., fixed image's space |" in report
    assert "**Model grid**" in report and "**Fixed image's space**" in report
    for method in METHODS:
        row = evaluation["rows"][method]
        assert 0 <= float(row["dice"]) <= 1 and 0 <= float(row["dice_fixed"]) <= 1


@pytest.mark.parametrize("method", METHODS)
def test_the_fixed_space_dice_is_plain_simpleitks_on_the_written_warped_label(evaluation, grid128, method):
    moving, fixed = PAIR
    warped = sitk.ReadImage(str(evaluation["out"] / "pairs" / f"{moving}__to__{fixed}" / f"warped_label_{method}.nii.gz"))
    fixed_label = sitk.ReadImage(str(grid128 / f"{fixed}_label.nii.gz"))
    assert warped.GetSize() == fixed_label.GetSize() and warped.GetOrigin() == pytest.approx(fixed_label.GetOrigin())
    assert float(evaluation["rows"][method]["dice_fixed"]) == pytest.approx(
        _dice_in_plain_simpleitk(fixed_label, warped), abs=1e-5)


def test_a_rerun_reuses_the_results_of_both_spaces(evaluation, grid128, capsys):
    argv = ["evaluate", "--data", grid128, "--dim", "3", "--crop", "organ", "--methods", ",".join(METHODS),
            "--pairs", ":".join(PAIR), "--workers", "1", "--iterations", "10", "--out", evaluation["out"]]
    assert main([str(a) for a in argv]) == 0
    assert "elastix" not in capsys.readouterr().err  # nothing registered again
