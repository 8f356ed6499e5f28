"""Ground-truth generation: corresponding surface points, per-pair cache and resume, failures, SDM on real GT."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.contract.paths import repo_file
from AgentRegistrationLib.core.sdm import StatisticalDeformationModel
from AgentRegistrationLib.data.dataset import find_subjects
from AgentRegistrationLib.elastix.constrained import ray_directions, surface_points
from AgentRegistrationLib.stages.groundtruth import (
    GroundTruthSummary,
    PairResult,
    failure_lines,
    failure_summary,
    load_pair,
    pair_file,
    run_groundtruth,
    run_report,
)


def _mask(load_case, case="00"):
    return sitk.GetArrayFromImage(load_case(case)[1]) > 0


@pytest.mark.parametrize("dim", [2, 3])
def test_surface_points_lie_on_the_mask_surface(load_case, dim):
    mask = _mask(load_case)
    mask = mask[16] if dim == 2 else mask
    points = surface_points(mask, ray_directions(dim, 64 if dim == 2 else 256))
    index = np.rint(points[:, ::-1]).astype(int)  # array order
    assert mask[tuple(index.T)].all()  # inside, ...
    outward = np.rint(points[:, ::-1] + 1.5 * ray_directions(dim, len(points))[:, ::-1]).astype(int)
    outward = np.clip(outward, 0, np.array(mask.shape) - 1)
    assert (~mask[tuple(outward.T)]).mean() > 0.9  # ... and just outside lies background: the surface


def test_points_correspond_under_a_known_shift(load_case):
    """Shift a real mask: each ray's point moves by exactly the shift, so point i matches point i."""
    mask = _mask(load_case)
    shifted = np.roll(mask, (2, -5, 7), axis=(0, 1, 2))
    directions = ray_directions(3, 256)
    a, b = surface_points(mask, directions), surface_points(shifted, directions)
    assert np.allclose(b - a, [7, -5, 2], atol=1e-9)
    spread = np.linalg.norm(a - a.mean(0), axis=1)
    assert spread.min() > 3  # spread over the surface, not bunched at the centre


def test_points_on_an_empty_mask_are_an_error():
    with pytest.raises(ValueError, match="empty mask"):
        surface_points(np.zeros((5, 5), bool), ray_directions(2, 8))


def test_cache_resume_and_failures(tiny_pipeline, tmp_path):
    """A rerun loads every pair from its cache file; a deleted pair alone is recomputed; a failing pair is
    reported and skipped."""
    tiny = tiny_pipeline(2)
    subject_dir, names, geometry = tiny["gt"] / "subjects", tiny["subjects"], tiny["geometry"]
    mtimes = {p: p.stat().st_mtime_ns for p in (tiny["gt"] / "pairs").glob("*.npz")}
    assert len(mtimes) == 12
    results, failures = run_groundtruth(subject_dir, names, geometry, tiny["gt"], workers=1)
    assert len(results) == 12 and not failures
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing recomputed

    out = tmp_path / "gt"
    (out / "pairs").mkdir(parents=True)
    kept = pair_file(tiny["gt"], names[0], names[1])
    (out / "pairs" / kept.name).write_bytes(kept.read_bytes())
    empty = tmp_path / "empty_subject"  # not in the shared pipeline's folder
    empty.mkdir()
    with np.load(subject_dir / f"{names[2]}.npz") as z:
        np.savez(empty / "blank.npz", image=z["image"], label=np.zeros_like(z["label"]))
    for n in names[:2]:
        (empty / f"{n}.npz").write_bytes((subject_dir / f"{n}.npz").read_bytes())
    pairs = [(names[0], names[1]), (names[1], names[0]), ("blank", names[0])]
    results, failures = run_groundtruth(empty, [], geometry, out, pairs=pairs, workers=1,
                                        settings={"iterations": 20, "resolutions": 1})
    assert sorted((r.moving, r.fixed) for r in results) == sorted(pairs[:2])
    assert load_pair(out / "pairs" / kept.name).coefficients.tolist() == load_pair(kept).coefficients.tolist()
    assert [f[:2] for f in failures] == [("blank", names[0])] and "empty mask" in failures[0][2]
    assert json.loads((out / "failures.json").read_text())[0][0] == "blank"


def test_failure_summary_names_the_subjects_and_says_when_to_stop():
    """A few scattered failures are within the limit; more than 10 % of the pairs, or one subject that lost every
    pair, are not. Each message groups its pairs, the subjects with the most failed pairs first."""
    names = [f"s{i:02d}" for i in range(20)]
    pairs = [(m, f) for m in names for f in names if m != f]  # 380 ordered pairs, 38 per subject
    scattered = [("s00", "s01", "RuntimeError: elastix diverged"), ("s02", "s03", "RuntimeError: elastix diverged"),
                 ("s04", "s05", "ValueError: other")]
    few = failure_summary(pairs, scattered, 0.10)
    assert not few["too_many"] and few["subjects_without_pairs"] == []
    assert [g["message"] for g in few["groups"]] == ["RuntimeError: elastix diverged", "ValueError: other"]
    assert few["groups"][0]["subjects"][0] == ["s00", 1, 38]
    lines = failure_lines(few)
    assert lines[0] == "3 of 380 ground-truth pairs failed (1 %):"
    assert "  2 pairs: RuntimeError: elastix diverged" in lines
    many = [(m, f, "RuntimeError: elastix diverged") for m, f in pairs[::9]]  # 43 pairs: 11 %
    assert failure_summary(pairs, many, 0.10)["too_many"]
    assert not failure_summary(pairs, many[:38], 0.10)["too_many"]  # 10 % exactly is still allowed
    empty = "ValueError: cannot place surface points on an empty mask"
    lost = [(m, f, empty) for m, f in pairs if "s07" in (m, f)]  # 38 pairs (10 %) ...
    summary = failure_summary(pairs, lost, 0.10)  # ... within the limit, but s07 has no pair left
    assert summary["too_many"] and summary["subjects_without_pairs"] == ["s07"]
    assert summary["groups"][0]["subjects"][:2] == [["s07", 38, 38], ["s00", 2, 38]]
    text = "\n".join(failure_lines(summary))
    assert "s07 (38 of its 38), s00 (2 of its 38)" in text and "and 12 more" in text
    assert text.endswith("every pair failed for: s07")




def test_when_every_pair_fails_alike_the_error_points_at_the_settings(tmp_path):
    """Every pair failing with one message (as every pair of a geometry whose control grid elastix lays out otherwise
    did) is no fault of the subjects: the error says to change the settings, not to check named subjects."""
    from AgentRegistrationLib.core.geometry import ModelGeometry

    pairs = [("a", "b"), ("b", "a"), ("a", "c"), ("c", "a")]
    same = [(m, f, "RuntimeError: elastix used control grid ...") for m, f in pairs]
    alike = GroundTruthSummary.of_run(ModelGeometry.paper(2), "a", ["a", "b", "c"], pairs, [], same, settings={},
                                      workers=1, max_pairs=0, seed=0, wall_seconds=1.0, max_failed_fraction=0.1)
    _, error = run_report(alike, tmp_path)
    assert error.startswith("every ground-truth pair failed (4 of 4), all with the same error")
    assert "--geometry" in error and "check the named subjects" not in error
    mixed = [*same[:3], ("c", "a", "ValueError: cannot place surface points on an empty mask")]
    varied = GroundTruthSummary.of_run(ModelGeometry.paper(2), "a", ["a", "b", "c"], pairs, [], mixed, settings={},
                                       workers=1, max_pairs=0, seed=0, wall_seconds=1.0, max_failed_fraction=0.1)
    assert "check the named subjects" in run_report(varied, tmp_path)[1]


# written by 'agentreg groundtruth' before the summary recorded the subjects' source and the elastix resolutions
EARLIEST_SUMMARY = {
    "dim": 2, "geometry": {"size": [100, 100], "control_spacing": [16.0, 16.0], "crop_fraction": [0.78, 0.78, 1.0],
                           "box_spreads": [10.0, 10.0]},
    "template": "case00", "subjects": ["case00", "case03", "case04"], "pairs_requested": 6, "pairs_done": 6,
    "failures": 0, "dice_before": {"median": 0.9, "mean": 0.9, "std": 0.01, "n": 6},
    "dice_after": {"median": 0.97, "mean": 0.96, "std": 0.01, "n": 6}, "pair_seconds_sum": 60.5,
    "wall_seconds_this_run": 31.0, "workers": 2, "iterations": 200, "max_pairs": 0, "seed": 0}


def test_groundtruth_summary_keeps_its_json_and_reads_earlier_folders(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(EARLIEST_SUMMARY))
    summary = GroundTruthSummary.load(tmp_path)
    assert summary.geometry.size == (100, 100) and summary.geometry.localised
    assert summary.source == {} and summary.resolutions is None and summary.failed is None
    assert json.loads(json.dumps(summary.to_dict())) == EARLIEST_SUMMARY and list(summary.to_dict()) == list(EARLIEST_SUMMARY)
    names = ["case00", "case03", "case04"]
    pairs = [(m, f) for m in names for f in names if m != f]
    results = [PairResult(m, f, np.zeros(2), 0.8, 0.9, 2.0) for m, f in pairs[1:]]
    source = {"data": "/data", "selection": "split", "split": "split.json", "subset": "training"}
    made = GroundTruthSummary.of_run(
        summary.geometry, "case00", names, pairs, results, [("case00", "case03", "RuntimeError: diverged")],
        settings={"iterations": 250, "resolutions": 3}, workers=2, max_pairs=0, seed=0, wall_seconds=9.0,
        max_failed_fraction=0.1, source=source)
    made.save(tmp_path / "new")
    written = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert list(written) == ["dim", "geometry", "template", "subjects", "data", "selection", "split", "subset",
                             "pairs_requested", "pairs_done", "failures", "dice_before", "dice_after",
                             "pair_seconds_sum", "wall_seconds_this_run", "workers", "iterations", "resolutions",
                             "max_pairs", "seed", "failed"]
    assert written["pairs_requested"] == 6 and written["pairs_done"] == 5 and written["failures"] == 1
    assert written["dice_after"]["median"] == 0.9 and written["pair_seconds_sum"] == 10.0
    assert written["failed"]["too_many"]  # 1 of 6 pairs is more than 10 %
    assert GroundTruthSummary.load(tmp_path / "new") == made


def test_groundtruth_summary_errors_say_to_run_groundtruth(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a ground-truth folder \(no summary.json\): "
                                                r"run 'agentreg groundtruth' first"):
        GroundTruthSummary.load(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({k: v for k, v in EARLIEST_SUMMARY.items() if k != "seed"}))
    with pytest.raises(ValueError, match=r"summary.json is not a ground-truth summary that can be read \(no 'seed'\)"):
        GroundTruthSummary.load(tmp_path)
    (tmp_path / "summary.json").write_text("{")
    with pytest.raises(ValueError, match="run 'agentreg groundtruth' again"):
        GroundTruthSummary.load(tmp_path)


def test_gt_improves_dice_and_sdm_reconstructs_real_deformations(tiny_pipeline):
    tiny = tiny_pipeline(2)
    results = [load_pair(p) for p in sorted((tiny["gt"] / "pairs").glob("*.npz"))]
    assert np.median([r.dice_after for r in results]) > np.median([r.dice_before for r in results]) + 0.1
    coefficients = np.stack([r.coefficients for r in results])
    grid = tiny["geometry"].control_grid()
    full = StatisticalDeformationModel.fit(coefficients, len(results) - 1, grid)
    assert np.allclose(full.reconstruct(full.project(coefficients)), coefficients, atol=1e-6)
    errors = [np.abs(StatisticalDeformationModel.fit(coefficients, d, grid).reconstruct(
        StatisticalDeformationModel.fit(coefficients, d, grid).project(coefficients)) - coefficients).mean()
              for d in (1, 4, 8)]
    assert errors[0] > errors[1] > errors[2]


def test_subjects_from_a_csv(grid128, tmp_path):
    csv = tmp_path / "subjects.csv"
    csv.write_text("name,image,label\n" + "".join(
        f"s{c},{grid128 / f'case{c}_image.nii.gz'},{grid128 / f'case{c}_label.nii.gz'}\n" for c in ("00", "04")))
    subjects = find_subjects(csv)
    assert [s.name for s in subjects] == ["s00", "s04"] and subjects[1].label.name == "case04_label.nii.gz"
    bad = tmp_path / "bad.csv"
    bad.write_text("img,seg\na,b\n")
    with pytest.raises(ValueError, match="columns 'image' and 'label'"):
        find_subjects(bad)


def test_signed_distance_is_negative_inside_and_clipped():
    from AgentRegistrationLib.elastix.constrained import signed_distance

    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 10:30] = 2  # any label value is organ
    d = signed_distance(mask, clip=5.0)
    assert d[20, 20] == -5.0 and d[0, 0] == 5.0  # deep inside / far outside: clipped
    assert d[10, 20] == -1.0 and d[9, 20] == 1.0  # the surface lies between the first voxel inside and outside


def test_distance_ground_truth_through_the_cli(grid128, tmp_path, capsys):
    """``--metric distance`` on real 3-D crops on the organ: recorded in the summary, Dice after above before on
    every pair, and a rerun into the folder with the other metric is refused (its pairs would be mixed)."""

    out = tmp_path / "gt"
    argv = ["groundtruth", str(grid128), "--subjects", "case00,case04,case06", "--dim", "3", "--geometry", "paper",
            "--crop", "organ", "--iterations", "30", "--resolutions", "1", "--workers", "1", "--max-pairs", "3",
            "--out", str(out)]
    assert main([*argv, "--metric", "distance"]) == 0
    summary = GroundTruthSummary.load(out)
    assert summary.metric == "distance" and summary.pairs_done == 3
    for path in sorted((out / "pairs").glob("*.npz")):
        r = load_pair(path)
        assert r.dice_after > r.dice_before
    assert json.loads(GroundTruthSummary.path(out).read_text())["metric"] == "distance"
    capsys.readouterr()
    assert main([*argv, "--metric", "points"]) != 0
    assert "holds a ground truth of metric 'distance'; this run asks for metric 'points'" in capsys.readouterr().err
    # the paper's metric on the same pairs, in its own folder, and the two compared pair by pair
    points = tmp_path / "gt_points"
    assert main([*argv[:-1], str(points), "--metric", "points"]) == 0
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_groundtruth",
                                                  repo_file("scripts", "experiments", "compare_groundtruth.py"))
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    table = compare.compare([points, out], ["points", "distance"])
    assert table.startswith("3 ordered pairs in both folders")
    after = [float(load_pair(path).dice_after) for path in sorted((out / "pairs").glob("*.npz"))]
    assert f"| distance | distance, 30 iterations x 1 resolutions | {np.median(after):.3f} |" in table


def test_groundtruth_names_a_subject_whose_label_is_empty(grid128, tmp_path, capsys):
    """The masks are read once, before the geometry is derived: an empty one is named before any work starts."""

    for case in ("case00", "case04"):
        (tmp_path / f"{case}_image.nii.gz").write_bytes((grid128 / f"{case}_image.nii.gz").read_bytes())
        label = sitk.ReadImage(str(grid128 / f"{case}_label.nii.gz"))
        sitk.WriteImage(label * 0 if case == "case04" else label, str(tmp_path / f"{case}_label.nii.gz"))
    assert main(["groundtruth", str(tmp_path), "--dim", "2", "--out", str(tmp_path / "gt")]) != 0
    assert "the label of case04 is empty: fix it or leave the subject out" in capsys.readouterr().err
    assert not (tmp_path / "gt").exists()
