"""``agentreg evaluate`` (the paper's Table 1 protocol) and ``agentreg demo`` on real PROMISE12 pairs.

Small but real: 2 ordered validation pairs in 2-D with the tiny trained bundle of ``tiny_pipeline``
and few elastix iterations; the demo registers 1 pair. No figure is asserted to be good except the
one that must hold: the GT, which sees both masks, is at least as good as the translation.
"""

from __future__ import annotations

import csv
import json

import pytest
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.model.bundle import load_bundle
from AgentRegistrationLib.stages.evaluation_report import gains_over_start

METHODS = ["T", "e16", "ours", "nfc", "gt"]


@pytest.fixture(scope="module")
def evaluation(grid128, tiny_pipeline, tmp_path_factory):
    tiny = tiny_pipeline(2)
    out = tmp_path_factory.mktemp("evaluate")
    argv = ["evaluate", "--data", str(grid128), "--dim", "2", "--model", str(tiny["bundle"]), "--out", str(out / "cache"),
            "--report", str(out / "results" / "evaluation_2d.md"), "--max-pairs", "2", "--methods", ",".join(METHODS),
            "--workers", "1", "--device", "cpu", "--iterations", "60", "--gt-iterations", "60"]
    assert main(argv) == 0
    return {"out": out, "argv": argv, "report": out / "results" / "evaluation_2d.md"}


def _rows(evaluation) -> list[dict]:
    with (evaluation["report"].with_suffix(".csv")).open() as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_table_csv_and_box_plots(evaluation):
    text = evaluation["report"].read_text()
    assert "agentreg evaluate --data" in text and "--max-pairs 2" in text  # the exact command line
    for row in ("DICE Mean", "DICE Med.", "DICE StD.", "HD Mean", "HD Med.", "HD StD.", "% folding", "seconds per pair"):
        assert row in text
    assert "model-grid voxels" in text
    png = evaluation["report"].with_name("evaluation_2d_boxplots.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(evaluation)
    assert len(rows) == 2 * len(METHODS)
    assert {r["method"] for r in rows} == set(METHODS)
    assert "| | median gain | mean gain | pairs improved |" in text  # what the agent adds to its start
    record = json.loads(evaluation["report"].with_suffix(".json").read_text())
    evaluated = {name for pair in record["pairs"] for name in pair}
    assert set(record["self_registration"]) == evaluated and "registered to itself" in text  # each subject to itself


def test_every_method_has_every_figure(evaluation):
    summary = json.loads(evaluation["report"].with_suffix(".json").read_text())
    assert summary["failures"] == []
    for method in METHODS:
        s = summary["summary"][method]
        assert s["n"] == 2
        for figure in ("dice", "hausdorff", "folding_percent", "seconds"):
            for stat in ("mean", "median", "std"):
                assert s[figure][stat] == s[figure][stat], f"{method} {figure} {stat} is NaN"
        assert 0.0 <= s["dice"]["mean"] <= 1.0 and s["hausdorff"]["mean"] >= 0 and s["seconds"]["mean"] > 0


def test_groundtruth_is_an_upper_bound_of_the_translation(evaluation):
    by_pair: dict[tuple[str, str], dict[str, float]] = {}
    for r in _rows(evaluation):
        by_pair.setdefault((r["moving"], r["fixed"]), {})[r["method"]] = float(r["dice"])
    for pair, dice in by_pair.items():
        assert dice["gt"] >= dice["T"], f"{pair}: GT Dice {dice['gt']:.3f} < translation Dice {dice['T']:.3f}"


def test_prepared_pairs_are_read_back_from_the_cache_by_geometry(evaluation):
    from AgentRegistrationLib.core.geometry import ModelGeometry
    from AgentRegistrationLib.stages.evaluation_pairs import prepared_pairs

    found = prepared_pairs(evaluation["out"] / "cache", ModelGeometry.paper(2))
    assert sorted(names for names, _ in found) == sorted({(r["moving"], r["fixed"]) for r in _rows(evaluation)})
    for _, pair in found:
        assert pair["fixed"].shape == pair["moving"].shape == (100, 100)
    assert [names for names, _ in prepared_pairs(evaluation["out"] / "cache", ModelGeometry.paper(2), 1)] == [found[0][0]]
    assert prepared_pairs(evaluation["out"] / "cache", ModelGeometry.paper(3)) == []  # made for another grid


def test_rerun_uses_the_cache(evaluation):
    cached = sorted((evaluation["out"] / "cache" / "pairs").rglob("*.*"))
    assert len(cached) == 2 * (len(METHODS) + 1)  # one prepared pair + one result per method
    before = {p: p.stat().st_mtime_ns for p in cached}
    assert main(evaluation["argv"]) == 0
    assert {p: p.stat().st_mtime_ns for p in cached} == before


def test_model_card_shows_the_evaluation_of_its_own_model(evaluation, tiny_pipeline, tmp_path, capsys):
    bundle = tiny_pipeline(2)["bundle"]
    summary = evaluation["report"].with_suffix(".json")
    card = tmp_path / "card.md"
    assert main(["info", str(bundle), "--card", str(card), "--evaluation", str(summary)]) == 0
    text = card.read_text()
    assert "Table 1 protocol on 2 ordered pairs" in text
    assert "metric `points`)" in text  # the ground truth the model was trained on
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(METHODS) <= set(rows)
    doc = json.loads(summary.read_text())
    assert f"{doc['summary']['ours']['dice']['median']:.3f}" in rows["ours"]
    other = tmp_path / "other.pt"  # another model file (same weights, one more training record)
    changed = load_bundle(bundle)
    changed.training["note"] = "another model"
    changed.save(other)
    capsys.readouterr()
    assert main(["info", str(other), "--evaluation", str(summary)]) == 1
    assert "was not made with" in capsys.readouterr().err


def test_the_agent_runs_the_models_default_number_of_steps_unless_told(evaluation, tiny_pipeline, tmp_path):
    model = tmp_path / "seven-steps.pt"
    bundle = load_bundle(tiny_pipeline(2)["bundle"])
    bundle.agent_defaults["steps"] = 7
    bundle.save(model)
    argv = evaluation["argv"][:]
    argv[argv.index("--model") + 1] = str(model)
    argv[argv.index("--methods") + 1] = "ours"
    argv[argv.index("--report") + 1] = str(tmp_path / "seven.md")
    for extra, steps in (([], 7), (["--steps", "3"], 3)):
        assert main(argv + extra) == 0
        summary = json.loads((tmp_path / "seven.json").read_text())
        assert summary["model"] == str(model)
        assert f"the agent, {steps} steps" in (tmp_path / "seven.md").read_text()


def test_the_gt_reference_uses_the_metric_of_the_models_ground_truth(evaluation, tiny_pipeline, tmp_path):
    trained = load_bundle(tiny_pipeline(2)["bundle"])
    assert trained.training["data"]["groundtruth_metric"] == "points"  # as the training recorded it
    model = tmp_path / "distance.pt"
    trained.training["data"]["groundtruth_metric"] = "distance"  # as a model trained on a distance ground truth
    trained.save(model)
    argv = evaluation["argv"][:]
    argv[argv.index("--model") + 1] = str(model)
    argv[argv.index("--methods") + 1] = "gt"
    argv[argv.index("--max-pairs") + 1] = "1"
    argv[argv.index("--report") + 1] = str(tmp_path / "gt.md")
    assert main(argv) == 0
    assert "the `distance` ground truth" in (tmp_path / "gt.md").read_text()
    assert _gt_metrics(evaluation) == ["distance", "points"]  # the first pair's gt was rerun; not the cached one
    assert main(argv + ["--gt-metric", "points"]) == 0  # told
    assert "the `points` ground truth" in (tmp_path / "gt.md").read_text()
    assert _gt_metrics(evaluation) == ["points", "points"]


def _gt_metrics(evaluation) -> list[str]:
    """The ground-truth metric of each cached gt result."""
    results = [json.loads(p.read_text()) for p in (evaluation["out"] / "cache" / "pairs").rglob("gt.json")]
    return sorted(r["signature"].get("metric", "points") for r in results)


def test_demo_registers_a_pair_and_writes_its_outputs(grid128, tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--data", str(grid128), "--model", str(tiny_pipeline(2)["bundle"]), "--out", str(out),
                 "--pairs", "1", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Dice before" in printed and "e16" in printed
    (pair,) = [p for p in out.iterdir() if p.is_dir()]
    for name in ("warped.nii.gz", "warped_label.nii.gz", "displacement.nii.gz", "trajectory.csv", "trajectory.png",
                 "qa.png", "metrics.json", "figure.png"):
        assert (pair / name).is_file(), name
    metrics = json.loads((pair / "metrics.json").read_text())
    before, after = metrics["dice_before"], metrics["dice_after"]
    (row,) = [line for line in printed.splitlines() if line.startswith(pair.name.replace("_to_", " -> "))]
    if round(after, 3) < round(before, 3):  # the summary names a pair the agent made worse
        assert row.endswith("WORSE") and f"WORSE: {pair.name.replace('_to_', ' -> ')} (Dice {before:.3f}" in printed
    else:
        assert "WORSE" not in row and "The agent made none of the 1 pair(s) worse." in printed


def test_demo_without_data_says_where_to_put_it(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert "../shared/data/promise12/grid128" in err and "caseNN_image.nii.gz" in err
    assert not (tmp_path / "demo").exists()


def test_demo_without_model_says_how_to_get_one(grid128, tmp_path, capsys):
    assert main(["demo", "--data", str(grid128), "--model", str(tmp_path / "none.pt"), "--out", str(tmp_path / "d")]) == 1
    assert "agentreg train" in capsys.readouterr().err


def test_unknown_method_is_a_clear_error(grid128, tmp_path, capsys):
    assert main(["evaluate", "--data", str(grid128), "--out", str(tmp_path), "--methods", "T,e12"]) == 1
    assert "e12" in capsys.readouterr().err


def test_pairs_are_checked(grid128, tmp_path, capsys):
    assert main(["evaluate", "--data", str(grid128), "--out", str(tmp_path), "--methods", "T",
                 "--pairs", "case02:case00"]) == 1
    assert "MOVING:FIXED" in capsys.readouterr().err


def test_the_gain_over_the_start_is_per_pair_and_counts_the_pairs_made_worse():
    rows = [("a", "b", 0.80, 0.85), ("b", "a", 0.70, 0.60), ("a", "c", 0.90, 0.89), ("c", "a", 0.50, 0.50)]
    results = [{"moving": m, "fixed": f, "method": method, "dice": d} for m, f, start, end in rows
               for method, d in (("localised", start), ("ours", end))]
    gains = gains_over_start(results, ["none", "localised", "ours"])["ours"]
    assert gains["n"] == 4 and gains["improved"] == 0.25 and gains["worse"] == 0.25  # -0.01 is not worse than 0.02
    assert gains["median"] == pytest.approx(-0.005) and gains["mean"] == pytest.approx(-0.015)
    assert gains_over_start(results, ["none", "ours"]) == {}  # no start evaluated: no gain to report
