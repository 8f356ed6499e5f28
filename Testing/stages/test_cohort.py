"""``agentreg register-many``: many pairs with one model load (AgentRegistrationLib.stages.cohort), through ``cli.main``.

Real PROMISE12 slices (native, written as a user has them: NIfTI/NRRD, rotated, shifted, anisotropic; and
grid128) with the shipped 2-D model: these tests check the command, its files and that a
batch changes no pair's result, not accuracy.

Identical or not: a pair registered in a batch gets the same agent actions and parameters as the pair alone,
so its warped image and label, displacement field and metrics (all but the seconds and ``pairs_in_batch``) are
identical to the bit. The Q-values in trajectory.csv may differ in their last printed digit: the network
evaluates a batch of N pairs with other float32 kernels than one pair (the sums are not formed in the same
order), which moves a Q-value by about 1e-6 of the largest; printed with 5 digits, one may change in the last.
That changed no action here (nor on the 3-D validation pairs of scripts/benchmarks/benchmark_cohort.py).
"""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.stages.cohort_pairs import pairs_from_csv, patient_images

STEPS = 8
TIMING = ("seconds_total", "seconds_preprocessing", "seconds_agent", "seconds_outputs", "pairs_in_batch")
ANGLE = math.radians(30)
DIRECTION = (math.cos(ANGLE), -math.sin(ANGLE), math.sin(ANGLE), math.cos(ANGLE))


def _grid_slice(grid128, case: str):
    """The slice through the prostate's centre of grid128 subject ``case`` (image, label)."""
    label = sitk.ReadImage(str(grid128 / f"case{case}_label.nii.gz"))
    z = int(np.round(np.nonzero(sitk.GetArrayFromImage(label))[0].mean()))
    return [sitk.ReadImage(str(grid128 / f"case{case}_{kind}.nii.gz"))[:, :, z] for kind in ("image", "label")]


@pytest.fixture(scope="module")
def files(native_slice, grid128, tmp_path_factory):
    """Images and labels on disk: native 13 (NIfTI) and 19 (NRRD), grid128 00 and 04 (MHA)."""
    folder = tmp_path_factory.mktemp("cohort_inputs")
    images = {"n13": native_slice("13", 8, (12.5, -30.0), (0.6, 0.6), DIRECTION),
              "n19": native_slice("19", 11, (16.0, -33.0), (0.58, 0.62), DIRECTION),
              "g00": _grid_slice(grid128, "00"), "g04": _grid_slice(grid128, "04")}
    suffix = {"n13": ".nii.gz", "n19": ".nrrd", "g00": ".mha", "g04": ".mha"}
    paths = {}
    for key, (image, label) in images.items():
        paths[key] = folder / f"{key}{suffix[key]}"
        paths[key + "_label"] = folder / f"{key}_label{suffix[key]}"
        sitk.WriteImage(image, str(paths[key]), True)
        sitk.WriteImage(label, str(paths[key + "_label"]), True)
    return paths


@pytest.fixture(scope="module")
def shipped_2d_model():
    """The shipped 2-D model: crops on the organ (a label or its localiser places them), so no worker loads elastix."""
    return Path(__file__).resolve().parents[2] / "Resources" / "Models" / "prostate-2d.pt"


PAIRS = [  # name, fixed, moving, labels: two fixed images, and a pair without labels in the same batch
    ("a", "n13", "n19", True),
    ("b", "n19", "n13", True),
    ("c", "g00", "g04", False),
]


def _csv(path, files, rows) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "fixed", "moving", "fixed_label", "moving_label"])
        for name, fixed, moving, labels in rows:
            writer.writerow([name, files[fixed], files[moving], files[fixed + "_label"] if labels else "",
                             files[moving + "_label"] if labels else ""])
    return str(path)


def _many(model, out, *extra) -> list[str]:
    return ["register-many", "--model", str(model), "--output-dir", str(out), "--device", "cpu", "--steps",
            str(STEPS), *extra]


def _summary(out) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {row["pair"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def batch(files, shipped_2d_model, tmp_path_factory):
    """The three pairs in one agent batch."""
    root = tmp_path_factory.mktemp("cohort_batch")
    assert main(_many(shipped_2d_model, root / "out", "--pairs", _csv(root / "pairs.csv", files, PAIRS))) == 0
    return root / "out"


@pytest.fixture(scope="module")
def singles(files, shipped_2d_model, tmp_path_factory):
    """Each pair of ``PAIRS`` by its own ``agentreg register``."""
    root = tmp_path_factory.mktemp("cohort_singles")
    for name, fixed, moving, labels in PAIRS:
        extra = ["--fixed-label", str(files[fixed + "_label"]), "--moving-label", str(files[moving + "_label"])]
        assert main(["register", "--fixed", str(files[fixed]), "--moving", str(files[moving]), "--model",
                     str(shipped_2d_model), "--output-dir", str(root / name), "--device", "cpu", "--steps", str(STEPS),
                     *(extra if labels else [])]) == 0
    return root


def _array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _trajectory(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same_results(folder, reference) -> None:
    """The outputs of ``folder`` are those of ``reference`` (see the module's note on the Q-values)."""
    for name in ("warped.nii.gz", "warped_label.nii.gz", "displacement.nii.gz"):
        assert (folder / name).exists() == (reference / name).exists(), name
        if (reference / name).exists():
            a, b = sitk.ReadImage(str(folder / name)), sitk.ReadImage(str(reference / name))
            assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection(), name
            np.testing.assert_array_equal(_array(folder / name), _array(reference / name), err_msg=name)
    metrics, expected = (json.loads((f / "metrics.json").read_text()) for f in (folder, reference))
    assert {k: v for k, v in metrics.items() if k not in TIMING} == {k: v for k, v in expected.items() if k not in TIMING}
    rows, expected_rows = _trajectory(folder / "trajectory.csv"), _trajectory(reference / "trajectory.csv")
    assert len(rows) == len(expected_rows) == STEPS
    for row, other in zip(rows, expected_rows, strict=True):
        assert {k: v for k, v in row.items() if not k.startswith("q_")} == \
               {k: v for k, v in other.items() if not k.startswith("q_")}
        q, q_other = (np.array([float(r[k]) for k in r if k.startswith("q_")]) for r in (row, other))
        assert np.abs(q - q_other).max() <= 2e-4 * np.abs(q_other).max()  # one unit of the 5th printed digit at most


# -- one batch, the results of separate runs ---------------------------------------------------------------------
def test_a_batch_gives_each_pair_the_results_of_its_own_register_run(batch, singles):
    for name, *_ in PAIRS:
        _same_results(batch / name, singles / name)
    assert json.loads((batch / "a" / "metrics.json").read_text())["pairs_in_batch"] == 3


def test_each_pair_folder_holds_the_files_of_agentreg_register(batch, singles):
    for name, *_ in PAIRS:
        assert sorted(p.name for p in (batch / name).iterdir()) == sorted(p.name for p in (singles / name).iterdir())
    assert not [p for p in batch.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_each_pair_has_its_qa_figure_with_the_outlines_of_its_labels(batch):
    """qa.png per pair: a 2-D model's pair is one slice with the fixed (green) and warped moving (red) outlines where
    both labels were given, and none where they were not."""
    import matplotlib.image

    for name, _, _, labels in PAIRS:
        pixels = matplotlib.image.imread(str(batch / name / "qa.png"))[..., :3]
        red, green = (int(np.all(np.abs(pixels - colour) < 0.1, axis=-1).sum()) for colour in ((1, 0, 0), (0, 1, 0)))
        assert (red > 50 and green > 50) if labels else (red == green == 0), name


def test_summary_has_a_row_per_pair_with_dice_and_hausdorff_where_both_labels_exist(batch):
    rows = _summary(batch)
    assert list(rows) == ["a", "b", "c"] and {r["status"] for r in rows.values()} == {"registered"}
    for name in ("a", "b"):
        metrics = json.loads((batch / name / "metrics.json").read_text())
        assert float(rows[name]["dice_after"]) == pytest.approx(metrics["dice_after"], abs=1e-4)
        assert float(rows[name]["hausdorff_before"]) > 0 and float(rows[name]["hausdorff_after"]) > 0
    assert rows["c"]["dice_before"] == rows["c"]["dice_after"] == rows["c"]["hausdorff_after"] == ""
    assert all(float(r["seconds"]) > 0 and int(r["steps"]) == STEPS and r["message"] == "" for r in rows.values())


# -- resuming ------------------------------------------------------------------------------------------------------
def test_a_rerun_skips_finished_pairs_and_redoes_an_incomplete_one(files, shipped_2d_model, batch, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(batch, out)
    written = {name: (out / name / "warped.nii.gz").stat().st_mtime_ns for name in ("a", "b", "c")}
    (out / "b" / "trajectory.png").unlink()  # as if the run had been stopped while writing b
    pairs = _csv(tmp_path / "pairs.csv", files, PAIRS)
    assert main(_many(shipped_2d_model, out, "--pairs", pairs)) == 0
    rows = _summary(out)
    assert [rows[n]["status"] for n in ("a", "b", "c")] == ["skipped", "registered", "skipped"]
    assert rows["a"]["dice_after"] == _summary(batch)["a"]["dice_after"]
    assert (out / "a" / "warped.nii.gz").stat().st_mtime_ns == written["a"]
    assert (out / "b" / "trajectory.png").is_file()
    _same_results(out / "b", batch / "b")


def test_a_rerun_with_other_settings_into_the_same_folder_is_refused(files, shipped_2d_model, batch, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(batch, out)
    assert main(_many(shipped_2d_model, out, "--pairs", _csv(tmp_path / "pairs.csv", files, PAIRS), "--seed", "1")) == 1
    err = capsys.readouterr().err
    assert "another model or other settings" in err and "agent" in err


# -- failures ------------------------------------------------------------------------------------------------------
def test_a_bad_pair_is_reported_and_the_others_finish(files, shipped_2d_model, tmp_path, capsys):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image" * 50)
    empty = sitk.ReadImage(str(files["n19_label"])) * 0
    sitk.WriteImage(empty, str(tmp_path / "empty_label.nrrd"))
    paths = {**files, "broken": broken, "broken_label": files["n13_label"], "n19e": files["n19"],
             "n19e_label": tmp_path / "empty_label.nrrd"}
    rows = [("good", "n13", "n19", True), ("unreadable", "broken", "n19", False), ("empty", "n13", "n19e", True)]
    out = tmp_path / "out"
    assert main(_many(shipped_2d_model, out, "--pairs", _csv(tmp_path / "pairs.csv", paths, rows))) == 0
    summary = _summary(out)
    assert [summary[n]["status"] for n in ("good", "unreadable", "empty")] == ["registered", "failed", "failed"]
    assert "cannot read fixed image" in summary["unreadable"]["message"] and str(broken) in summary["unreadable"]["message"]
    assert "moving label" in summary["empty"]["message"] and "is empty" in summary["empty"]["message"]
    assert (out / "good" / "metrics.json").is_file()
    assert not (out / "unreadable").exists() and not (out / "empty").exists()
    assert "unreadable: failed" in capsys.readouterr().err


def test_every_pair_failing_exits_with_status_1(files, shipped_2d_model, tmp_path, capsys):
    missing = {**files, "gone": tmp_path / "gone.nii.gz", "gone_label": ""}
    out = tmp_path / "out"
    pairs = _csv(tmp_path / "pairs.csv", missing, [("x", "gone", "n19", False)])
    assert main(_many(shipped_2d_model, out, "--pairs", pairs)) == 1
    assert "every pair failed" in capsys.readouterr().err
    assert _summary(out)["x"]["status"] == "failed"


# -- an atlas against a folder of patients --------------------------------------------------------------------------
def test_an_atlas_against_a_folder_writes_one_folder_per_patient(files, shipped_2d_model, tmp_path, capsys):
    patients = tmp_path / "patients"
    patients.mkdir()
    shutil.copy(files["n19"], patients / "p1.nrrd")
    shutil.copy(files["n19_label"], patients / "p1_label.nrrd")
    shutil.copy(files["g00"], patients / "p2_image.mha")  # no label: warped, no Dice
    (patients / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    argv = _many(shipped_2d_model, out, "--atlas", str(files["n13"]), "--atlas-label", str(files["n13_label"]), "--patients",
                 str(patients), "--progress-json")
    assert main(argv) == 0
    messages = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(m["done"], m["total"]) for m in messages if m["stage"] == "register"] == [(0, 2), (1, 2), (2, 2)]
    assert messages[-1]["stage"] == "done" and messages[-1]["failed"] == 0
    rows = _summary(out)
    assert list(rows) == ["p1", "p2"] and {r["status"] for r in rows.values()} == {"registered"}
    for name in ("p1", "p2"):
        assert (out / name / "warped_label.nii.gz").is_file()  # the atlas label on the patient
        assert rows[name]["moving"] == str(files["n13"])
    assert float(rows["p1"]["dice_after"]) > 0 and rows["p2"]["dice_after"] == ""
    fixed = sitk.ReadImage(str(patients / "p2_image.mha"))
    assert sitk.ReadImage(str(out / "p2" / "warped_label.nii.gz")).GetSize() == fixed.GetSize()


@pytest.mark.slow
def test_a_worker_process_gives_the_same_results(files, shipped_2d_model, batch, tmp_path):
    """The path of --workers > 1 (one pair, so one worker process is started; it imports torch and loads the
    model: about 10 s on an idle 2-core machine, several times that under load)."""
    out = tmp_path / "out"
    pairs = _csv(tmp_path / "pairs.csv", files, PAIRS[1:2])
    assert main(_many(shipped_2d_model, out, "--pairs", pairs, "--workers", "2")) == 0
    assert _summary(out)["b"]["status"] == "registered"
    _same_results(out / "b", batch / "b")


# -- the inputs ------------------------------------------------------------------------------------------------------
def test_csv_paths_are_relative_to_the_csv_and_names_default_to_moving_to_fixed(tmp_path):
    (tmp_path / "pairs.csv").write_text("fixed,moving,moving_label,fixed_point\n"
                                        "f/p1.nii.gz,atlas.nrrd,atlas_label.nrrd,\"1,2.5,-3\"\n")
    [pair] = pairs_from_csv(tmp_path / "pairs.csv")
    assert pair.name == "atlas_to_p1" and pair.fixed == tmp_path / "f" / "p1.nii.gz"
    assert pair.moving_label == tmp_path / "atlas_label.nrrd" and pair.fixed_label is None
    assert pair.fixed_point == (1.0, 2.5, -3.0)


def test_an_unknown_csv_column_is_named(tmp_path):
    (tmp_path / "pairs.csv").write_text("fixed,moving,fixed_labels\na.nii,b.nii,c.nii\n")
    with pytest.raises(ValueError, match="unknown column.*fixed_labels"):
        pairs_from_csv(tmp_path / "pairs.csv")


def test_two_pairs_writing_to_one_folder_are_refused(tmp_path):
    (tmp_path / "pairs.csv").write_text("fixed,moving\nx/p.nii.gz,a.nii.gz\ny/p.nii.gz,a.nii.gz\n")
    with pytest.raises(ValueError, match="same folder 'a_to_p'.*name"):
        pairs_from_csv(tmp_path / "pairs.csv")


def test_patient_folder_pairs_images_with_their_labels(tmp_path):
    for name in ("case01_image.nii.gz", "case01_label.nii.gz", "p2.nrrd", "readme.txt", ".hidden.nii.gz"):
        (tmp_path / name).write_text("")
    assert patient_images(tmp_path) == [("case01", tmp_path / "case01_image.nii.gz", tmp_path / "case01_label.nii.gz"),
                                        ("p2", tmp_path / "p2.nrrd", None)]


def test_pairs_and_atlas_together_are_refused(files, shipped_2d_model, tmp_path, capsys):
    argv = _many(shipped_2d_model, tmp_path / "out", "--pairs", "x.csv", "--atlas", str(files["n13"]))
    assert main(argv) == 1
    assert "either --pairs" in capsys.readouterr().err


# -- several atlases: one folder per atlas and a fused label per patient ----------------------------------------
ATLASES = ("n13", "g00", "g04")


@pytest.fixture(scope="module")
def fused_run(files, shipped_2d_model, tmp_path_factory):
    """Three atlases (real slices with their labels) onto two patients: p1 with its label, p2 without."""
    root = tmp_path_factory.mktemp("cohort_atlases")
    patients = root / "patients"
    patients.mkdir()
    shutil.copy(files["n19"], patients / "p1.nrrd")
    shutil.copy(files["n19_label"], patients / "p1_label.nrrd")
    shutil.copy(files["g04"], patients / "p2_image.mha")
    argv = _many(shipped_2d_model, root / "out", "--patients", str(patients))
    for atlas in ATLASES:
        argv += ["--atlas", str(files[atlas]), "--atlas-label", str(files[atlas + "_label"])]
    assert main(argv) == 0
    return root / "out", patients


def test_several_atlases_keep_each_atlas_result_per_patient(fused_run):
    out, patients = fused_run
    rows = _summary(out)
    pairs = [f"{p}/{a}" for p in ("p1", "p2") for a in ATLASES]
    assert list(rows) == pairs + ["p1/fused", "p2/fused"]
    assert all(rows[name]["status"] == "registered" for name in pairs)
    fixed = sitk.ReadImage(str(patients / "p1.nrrd"))
    for atlas in ATLASES:
        warped = sitk.ReadImage(str(out / "p1" / atlas / "warped_label.nii.gz"))
        assert warped.GetSize() == fixed.GetSize() and warped.GetOrigin() == pytest.approx(fixed.GetOrigin())
        metrics = json.loads((out / "p1" / atlas / "metrics.json").read_text())
        assert float(rows[f"p1/{atlas}"]["dice_after"]) == pytest.approx(metrics["dice_after"], abs=1e-4)


def test_the_fused_label_is_the_majority_of_the_atlas_labels_voxel_by_voxel(fused_run):
    """With three atlases a voxel is prostate where at least two of the labels the run wrote say so."""
    out, patients = fused_run
    for patient, image in (("p1", "p1.nrrd"), ("p2", "p2_image.mha")):
        votes = sum((_array(out / patient / atlas / "warped_label.nii.gz") > 0).astype(int) for atlas in ATLASES)
        fused = sitk.ReadImage(str(out / patient / "fused_label.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(fused) > 0, votes >= 2)
        assert 0 < (votes >= 2).sum() < votes.size and (votes == 1).any()  # the vote decides somewhere
        fixed = sitk.ReadImage(str(patients / image))
        assert fused.GetSize() == fixed.GetSize() and fused.GetDirection() == pytest.approx(fixed.GetDirection())


def test_the_fused_row_has_the_dice_of_the_fused_label_where_the_patient_has_a_label(fused_run):
    out, patients = fused_run
    rows = _summary(out)
    truth = _array(patients / "p1_label.nrrd") > 0
    fused = _array(out / "p1" / "fused_label.nii.gz") > 0
    expected = 2 * (truth & fused).sum() / (truth.sum() + fused.sum())
    assert rows["p1/fused"]["status"] == "fused" and float(rows["p1/fused"]["dice_after"]) == pytest.approx(expected,
                                                                                                          abs=1e-4)
    assert float(rows["p1/fused"]["hausdorff_after"]) >= 0 and rows["p1/fused"]["steps"] == ""
    assert rows["p2/fused"]["status"] == "fused" and rows["p2/fused"]["dice_after"] == ""


def test_majority_vote_ties_go_to_the_lowest_label():
    from AgentRegistrationLib.stages.cohort_results import majority_vote

    a = np.array([[0, 1, 2, 2], [1, 1, 0, 3]], np.uint8)
    b = np.array([[1, 1, 2, 1], [2, 0, 0, 3]], np.uint8)
    c = np.array([[1, 0, 1, 3], [3, 0, 2, 0]], np.uint8)
    # columns: two of three; two of three; two of three; one each (tie -> lowest, 1); one each -> 1; two 0s; two 0s; 3
    np.testing.assert_array_equal(majority_vote([a, b, c]), [[1, 1, 2, 1], [1, 0, 0, 3]])
    np.testing.assert_array_equal(majority_vote([a[:1], b[:1]]), [[0, 1, 2, 1]])  # two atlases: 0 vs 1 ties to 0


def test_several_atlases_each_need_a_label(files, shipped_2d_model, tmp_path, capsys):
    argv = _many(shipped_2d_model, tmp_path / "out", "--patients", str(tmp_path), "--atlas", str(files["n13"]), "--atlas-label",
                 str(files["n13_label"]), "--atlas", str(files["g00"]))
    assert main(argv) == 1
    assert "one label per atlas" in capsys.readouterr().err


def test_an_atlas_is_read_once_per_worker(files):
    from AgentRegistrationLib.data.inputs import read_register_inputs

    cache = {}
    first, second = (read_register_inputs(files[f], files["n13"], None, files["n13_label"], moving_cache=cache)
                     for f in ("n19", "g00"))
    assert second.moving is first.moving and second.moving_label is first.moving_label
    assert second.fixed is not first.fixed and len(cache) == 2


# -- a Dask scheduler instead of local processes ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed", reason="the 'distributed' extra (dask[distributed]) is not installed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.mark.slow
def test_register_many_on_a_dask_cluster_gives_the_local_results(files, shipped_2d_model, batch, dask_cluster, tmp_path):
    """Two worker processes of a LocalCluster read, prepare and write the pairs; the results are those of the local
    run, pair by pair."""
    out = tmp_path / "out"
    assert main(_many(shipped_2d_model, out, "--pairs", _csv(tmp_path / "pairs.csv", files, PAIRS), "--scheduler",
                      dask_cluster)) == 0
    assert {r["status"] for r in _summary(out).values()} == {"registered"}
    for name, *_ in PAIRS:
        _same_results(out / name, batch / name)


@pytest.mark.slow
def test_ground_truth_on_a_dask_cluster_gives_the_local_results(tiny_pipeline, dask_cluster, tmp_path):
    from AgentRegistrationLib.stages.groundtruth import pair_file, run_groundtruth

    tiny = tiny_pipeline(2)
    names, settings = tiny["subjects"], {"iterations": 20, "resolutions": 1}
    pairs = [(names[0], names[1]), (names[2], names[0])]
    runs = {}
    for where, scheduler in (("local", None), ("dask", dask_cluster)):
        # one local process: each process that runs elastix first loads it (~20 s of CPU)
        results, failures = run_groundtruth(tiny["gt"] / "subjects", names, tiny["geometry"], tmp_path / where, pairs,
                                            workers=1, settings=settings, scheduler=scheduler)
        assert not failures and sorted((r.moving, r.fixed) for r in results) == sorted(pairs)
        assert all(pair_file(tmp_path / where, m, f).is_file() for m, f in pairs)
        runs[where] = {(r.moving, r.fixed): r for r in results}
    for key in pairs:
        np.testing.assert_array_equal(runs["dask"][key].coefficients, runs["local"][key].coefficients)
        assert runs["dask"][key].dice_after == runs["local"][key].dice_after


def test_surface_distances_on_the_masks_box_equal_those_on_the_whole_image(native):
    """The distances are computed on the box around both masks (what makes a pair's metrics cheap on a large
    volume); they are those of the whole image, also for a mask that touches the image's edge (to the float32
    arithmetic of SimpleITK's distance transform: within 5e-6 of scipy's on this anisotropic spacing)."""
    from AgentRegistrationLib.core.metrics import surface_distances
    from scipy import ndimage

    def whole_image(a, b, spacing):
        sa, sb = (m & ~ndimage.binary_erosion(m, border_value=0) for m in (a, b))
        ab = ndimage.distance_transform_edt(~sb, sampling=spacing[::-1])[sa]
        ba = ndimage.distance_transform_edt(~sa, sampling=spacing[::-1])[sb]
        return {"hausdorff": max(ab.max(), ba.max()), "hausdorff95": max(np.percentile(ab, 95), np.percentile(ba, 95)),
                "average_surface_distance": np.concatenate([ab, ba]).mean()}

    a = _array(native / "case30_label.nii.gz") > 0
    shifted = np.roll(a, (1, 7, -5), axis=(0, 1, 2))
    edge = a.copy()
    edge[:, :, -3:] = True
    spacing = (0.5, 0.6, 3.0)
    for x, y in ((a, shifted), (a, edge), (shifted, edge)):
        assert surface_distances(x, y, spacing) == pytest.approx(whole_image(x, y, spacing), rel=5e-6)
