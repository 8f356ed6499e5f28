"""The ``agentreg`` argument parser: every subcommand and option, each bound to its command."""

from __future__ import annotations

import argparse

from AgentRegistrationLib.cli.commands import (
    MAX_FAILED_FRACTION,
    STEP_CHOICE_PAIRS,
    _numbers,
    cmd_demo,
    cmd_evaluate,
    cmd_groundtruth,
    cmd_info,
    cmd_localiser,
    cmd_register,
    cmd_register_many,
    cmd_sdm,
    cmd_train,
)
from AgentRegistrationLib.contract import training_config, training_folder
from AgentRegistrationLib.contract.paths import repo_file


# ----------------------------------------------------------------------------------------- main
def _organ(text: str) -> str:
    """An argparse type: :func:`training_folder.organ_name`, naming ``--organ`` when wrong."""
    try:
        return training_folder.organ_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_agent_options(p: argparse.ArgumentParser) -> None:
    """The agent's settings, the same for ``register`` and ``register-many``."""
    p.add_argument("--steps", type=int,
                   help="agent steps (MDP steps); default and 0: the model's own, chosen on its training pairs "
                        "('agentreg info MODEL' shows it); the paper used 200")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the agent's random choices (exploration and fuzzy action control); the same seed "
                        "gives the same result")
    p.add_argument("--no-fuzzy", action="store_true", help="switch fuzzy action control off (the paper's nfc)")
    p.add_argument("--fuzzy-k", type=float, help="fuzzy action control k (default: the model's, 1.5 as in the paper)")
    p.add_argument("--stop-on-convergence", action="store_true", help="stop early when the agent oscillates")
    p.add_argument("--no-similarity-guard", action="store_true",
                   help="keep the agent's end even when its crops are no more alike than at its start (the paper's "
                        "agent; by default the start is kept then: first, do no harm)")
    p.add_argument("--save-steps", type=int, default=0, metavar="K",
                   help="also write the warped image every K agent steps into steps/ of the output folder (for "
                        "stepping through them)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentreg", description=__doc__.splitlines()[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--progress-json", action="store_true", help="one JSON progress line per step on stdout")

    def subject_options(p):  # the labelled subjects a command learns from
        p.add_argument("data", help="folder of <name>_image/<name>_label files, or a CSV with columns image,label[,name]")
        p.add_argument("--dim", type=int, choices=(2, 3), default=3)
        p.add_argument("--split", help="subject split JSON, whose --subset subjects are used (e.g. "
                                       "Resources/promise12_split.json)")
        p.add_argument("--subset", default="train", choices=("train", "validation"))
        p.add_argument("--subjects", help="comma-separated subject names (instead of --split)")

    p = sub.add_parser(
        "groundtruth", help="constrained elastix GT deformations for every ordered pair",
        description="Constrained elastix ground-truth deformations for every ordered pair of the subjects. A pair "
                    "that fails (e.g. a subject with an empty mask) is reported and skipped; at the end a summary "
                    "names the failed pairs' subjects, grouped by the reason. Exit status: 0 done (with a warning "
                    f"when a few pairs failed), 1 when more than {100 * MAX_FAILED_FRACTION:.0f} % of the pairs "
                    "failed or some subject lost all its pairs (fix or leave out the named subjects and rerun the "
                    "same command: finished pairs are kept), or for an input to correct.")
    subject_options(p)
    p.add_argument("--out", required=True, help="output folder (per-pair cache; a rerun resumes)")
    p.add_argument("--template", help="template subject (default: the first)")
    p.add_argument("--max-pairs", type=int, default=0, help="random subset of at most this many ordered pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair subset")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (default: all cores)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="a Dask distributed scheduler (e.g. tcp://host:8786, of dask-jobqueue on a cluster): its "
                        "workers register the pairs instead of --workers local processes; they need this package and "
                        "OUT at the same path (a shared file system)")
    p.add_argument("--iterations", type=int, default=training_folder.GT_ITERATIONS,
                   help=f"elastix iterations per resolution (default {training_folder.GT_ITERATIONS})")
    p.add_argument("--resolutions", type=int, default=training_folder.GT_RESOLUTIONS,
                   help=f"elastix resolutions (image pyramid levels; default {training_folder.GT_RESOLUTIONS})")
    p.add_argument("--metric", choices=training_folder.GT_METRICS,
                   help="what drives the constrained registration: 'points', the paper's (mutual information of the "
                        "images, bending energy and corresponding points on the mask surfaces), or 'distance' (mean "
                        "squares of the masks' signed distance maps and bending energy: more Dice, see the README). "
                        "Default: 'distance' with --geometry auto, 'points' with the paper's geometry")
    p.add_argument("--geometry", choices=training_folder.GEOMETRY_CHOICES,
                   help="model geometry: 'paper' is the paper's prostate grids (100x100 / 75x75x20, control spacing "
                        "16x16(x8) grid voxels); 'auto' derives them from the training masks (isotropic voxels on the "
                        "organ's box, about the paper's voxel and control-point budget; crops on the organ). Default "
                        f"{training_folder.DEFAULT_GEOMETRY}, or 'paper' when --crop is given")
    p.add_argument("--crop", choices=training_folder.CROPS,
                   help="crop boxes of the paper's geometry: 'organ' centres each subject's box on its own mask and "
                        "sizes it to it; 'paper' is the paper's centred box with the subjects translated onto a "
                        "template (elastix). Default with --geometry paper: 'paper'; --geometry auto always crops on "
                        "the organ")
    p.add_argument("--grid-size", type=_numbers(int, "--grid-size"), metavar="NX,NY[,NZ]",
                   help="model grid size in voxels (overrides the geometry's)")
    p.add_argument("--control-spacing", type=_numbers(float, "--control-spacing"), metavar="SX,SY[,SZ]",
                   help="B-spline control spacing in model grid voxels (overrides the geometry's)")
    p.add_argument("--control-spacing-mm", type=_numbers(float, "--control-spacing-mm", (1, 2, 3)),
                   metavar="S[,SY[,SZ]]",
                   help="B-spline control spacing in the images' physical units (mm), one number for every axis or "
                        "one per axis; converted to grid voxels at the training masks' median model voxel (with crops "
                        "on the organ: the median organ's); instead of --control-spacing")
    p.add_argument("--box-spreads", type=_numbers(float, "--box-spreads"), metavar="BX,BY[,BZ]",
                   help="crop box per axis in standard deviations of the organ (crops on the organ; default "
                        "10,10(,7))")
    p.add_argument("--organ", type=_organ, metavar="NAME", help=training_folder.ORGAN_HELP)
    p.add_argument("--compare-elastix", type=int, default=0, metavar="N",
                   help="also register a seeded sample of N of the pairs with plain elastix B-spline (e8 and e16 of "
                        "'agentreg evaluate') and report their Dice beside the ground truth's: the ground truth must "
                        "beat them")
    common(p)
    p.set_defaults(func=cmd_groundtruth)

    p = sub.add_parser(
        "localiser", help="train the organ localiser of a model that crops on the organ",
        description="Train the learned organ localiser (a small U-Net) on labelled images: it places the fixed crop "
                    "of a model that crops on the organ, so that users need no label or point on the fixed image. "
                    "A 2-D localiser trains on the axial slices through each volume's organ. Give the result to "
                    "'agentreg train --localiser'.")
    subject_options(p)
    p.add_argument("--out", required=True, help="localiser file to write (.pt)")
    p.add_argument("--minutes", type=float, default=8.0, help="time limit of the training (default 8)")
    p.add_argument("--iterations", type=int, default=100_000, help="batches at most (default: the time limit ends it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--init", help="a localiser file to continue training (its network, settings and training record; "
                                  "with --iterations 0 it is only recalibrated and resaved with the settings below)")
    p.add_argument("--weighting", choices=training_folder.LOCALISER_WEIGHTINGS,
                   help="how the organ map becomes a centre and size: p, p2 (p squared), largest (the largest "
                        "component), ellipsoid (a fitted solid ellipsoid); default: the localiser's own (p2 new)")
    p.add_argument("--refine", choices=("yes", "no"),
                   help="a second, finer pass on a box around the first answer (default: the localiser's own, yes new)")
    common(p)
    p.set_defaults(func=cmd_localiser)

    p = sub.add_parser("sdm", help="fit the statistical deformation model (PCA) to GT deformations")
    p.add_argument("groundtruth", help="output folder of 'agentreg groundtruth'")
    p.add_argument("--modes", type=int, required=True, help="d: 15 in 2-D, 25 in 3-D in the paper")
    p.add_argument("--out", required=True, help="SDM file (.npz)")
    p.add_argument("--report-modes", default="", help="also report the reconstruction loss for these d, e.g. 5,10,15,25,40")
    p.add_argument("--report", help="write a markdown results file")
    common(p)
    p.set_defaults(func=cmd_sdm)

    p = sub.add_parser(
        "train", help="train the dual-stream Q-network on synthetic pairs (Eq. 1)",
        description="Train the dual-stream Q-network on synthetic intra- and inter-subject pairs (Eq. 1) made from "
                    "the ground truth of 'agentreg groundtruth', and save a model bundle. The model's default agent "
                    "settings: the stop rule of its configuration (on with 'converge', the default: a pair stops "
                    "once no action is predicted to help) and a cap on the number of steps chosen after training: "
                    "the step count from 1 to 200 with the best mean Dice on --step-pairs real pairs of the training "
                    "subjects (no validation subject). Its model card ('agentreg info MODEL') records both, and the "
                    "data, subjects and split it was trained on.")
    p.add_argument("--groundtruth", required=True, help="output folder of 'agentreg groundtruth' (training subjects and GT)")
    p.add_argument("--sdm", required=True, help="SDM file of 'agentreg sdm'")
    p.add_argument("--out", required=True, help="model bundle to write (.pt)")
    p.add_argument("--config", default=training_config.DEFAULT_TRAINING_CONFIGURATION,
                   help="training configuration by name: " + training_config.configurations_text())
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a configuration field (repeatable)")
    p.add_argument("--checkpoint", help="checkpoint file (default: OUT with .checkpoint.pt); an existing one is resumed")
    p.add_argument("--data", help="data folder or CSV, for validation on real pairs (with --split)")
    p.add_argument("--split", help="split JSON whose 'validation' subjects are used for validation (needs --data)")
    p.add_argument("--step-pairs", type=int, default=STEP_CHOICE_PAIRS, metavar="N",
                   help="real pairs of training subjects on which the model's default number of agent steps is chosen "
                        f"(best mean Dice over 1 to 200 steps; default {STEP_CHOICE_PAIRS}; 0: no choice, the paper's "
                        "200 steps)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes (checkpointed; run again to go on)")
    p.add_argument("--init", metavar="MODEL.pt",
                   help="fine-tune: start from this model's network (same architecture, model grid and SDM) instead of "
                        "random weights; a checkpoint to resume takes precedence")
    p.add_argument("--organ", type=_organ, metavar="NAME",
                   help="the organ's name, stored in the model and its card and used in its messages (default: the "
                        "ground truth's --organ, else 'organ')")
    p.add_argument("--localiser", action="append",
                   help="organ localiser file (agentreg localiser) to put in the model, one per image dimension "
                        "(repeatable); for ground truth made with --crop organ, it places the fixed crop of a new image")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "register", help="register a moving image to a fixed image with a trained agent",
        description="Register a moving image to a fixed image with a trained agent (2-D or 3-D, as the model). "
                    "Every input is checked before any work; the outputs (warped image, displacement field, "
                    "trajectory, metrics) are written to --output-dir only once all are complete, on the fixed "
                    "image's grid. Exit status: 0 done, 1 an input or setting to correct (one line says which).")
    p.add_argument("--fixed", required=True, metavar="IMAGE",
                   help="the fixed (reference) image: any file SimpleITK reads (NIfTI, NRRD, MHA, ...) or a folder of "
                        "one DICOM series (FOLDER@SeriesInstanceUID when it holds several), 2-D or 3-D, one grey value "
                        "per voxel; the outputs are on its grid")
    p.add_argument("--moving", required=True, metavar="IMAGE",
                   help="the moving image (a file or a DICOM series folder, as --fixed), warped onto the fixed image")
    p.add_argument("--model", required=True,
                   help="model bundle (.pt) of 'agentreg train' or of Resources/Models; its dimension must be the "
                        "images'")
    p.add_argument("--output-dir", required=True, metavar="FOLDER",
                   help="folder for warped.nii.gz, displacement.nii.gz, trajectory.csv/.png and metrics.json (made "
                        "if missing; files of an earlier run there are replaced)")
    p.add_argument("--fixed-label", metavar="LABEL",
                   help="label map of the organ in the fixed image (the model's organ; several label values allowed), "
                        "on its grid: gives Dice and surface distances before and after registration in metrics.json")
    p.add_argument("--moving-label", metavar="LABEL",
                   help="label map of the organ in the moving image, on its grid: warped too (warped_label.nii.gz); "
                        "with --fixed-label, Dice at every agent step")
    p.add_argument("--resample-labels", action="store_true",
                   help="resample a label that is not on its image's grid onto it (nearest neighbour) instead of "
                        "refusing it")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: fastest for one pair, and it does not slow down when "
                        "other programs use the cores; 0: torch's choice)")
    add_agent_options(p)
    p.add_argument("--fixed-point", metavar="X,Y[,Z]",
                   help="the organ's centre in the fixed image (physical LPS coordinates, as ITK): places the fixed "
                        "crop of a model that crops on the organ instead of its localiser")
    p.add_argument("--progress-json", action="store_true",
                   help="one JSON progress line per stage and agent step on stdout (for the Slicer module)")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser(
        "register-many", help="register many pairs (a CSV of pairs, or an atlas against a folder of patients)",
        description="Register many pairs with one model load: the pairs of a CSV (--pairs), or one atlas (--atlas, "
                    "--atlas-label) against every image of a folder of patients (--patients; each patient is the "
                    "fixed image, so the atlas label is propagated onto it). Each pair is checked and prepared as "
                    "'agentreg register' does it (in --workers processes), the agent runs on batches of pairs "
                    "(--batch-size), and each pair's results go into their own folder OUTPUT/<pair>, the files "
                    "'agentreg register' writes; OUTPUT/summary.csv has one row per pair (status registered, "
                    "skipped or failed; Dice and Hausdorff distance before and after where both labels exist; "
                    "seconds; warnings; why a pair failed). A pair that fails does not stop the others. Resumable: "
                    "rerun the same command and the pairs whose folder is complete are skipped (OUTPUT/cohort.json "
                    "records the model and settings; another model into the same folder is refused). Exit status: "
                    "0 when at least one pair was registered or skipped (failures are in the summary), 1 when every "
                    "pair failed or an input or setting is to correct (one line says which).")
    p.add_argument("--model", required=True, help="model bundle (.pt), e.g. Resources/Models/prostate-3d.pt")
    p.add_argument("--output-dir", required=True, metavar="FOLDER",
                   help="folder for one subfolder per pair (named by the CSV's 'name' column, else "
                        "<moving>_to_<fixed>; in the atlas mode by the patient) and summary.csv")
    p.add_argument("--pairs", metavar="CSV",
                   help="CSV of pairs with columns fixed,moving and optionally fixed_label,moving_label (masks on "
                        "their images' grids: Dice and distances, the warped label), fixed_point (x,y[,z], as "
                        "--fixed-point of 'agentreg register') and name; relative paths are relative to the CSV")
    p.add_argument("--atlas", metavar="IMAGE", action="append",
                   help="an atlas image (the moving image of every pair); repeat for several atlases: each patient "
                        "then gets OUTPUT/<patient>/<atlas>/ per atlas and OUTPUT/<patient>/fused_label.nii.gz, the "
                        "majority vote of the atlas labels (a tie goes to the lowest label: background)")
    p.add_argument("--atlas-label", metavar="LABEL", action="append",
                   help="the atlas's label, warped onto every patient (with several atlases: one each, in order)")
    p.add_argument("--patients", metavar="FOLDER",
                   help="folder of patient images (the fixed images: NIfTI, NRRD, MHA), <name>.<ext> or "
                        "<name>_image.<ext>, or subfolders of one DICOM series each (named after the subfolder); a "
                        "<name>_label.<ext> beside one gives Dice and distances")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that read, check and prepare the pairs and write their results while the agent "
                        "runs (default 1: all in this process; 0: one per core)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per agent batch on the device (default 16)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="a Dask distributed scheduler (e.g. tcp://host:8786, of dask-jobqueue on a cluster): its "
                        "workers read, prepare and write the pairs instead of --workers local processes; they need "
                        "this package and the files at the same paths (a shared file system); the agent runs here")
    p.add_argument("--resample-labels", action="store_true",
                   help="resample a label that is not on its image's grid onto it (nearest neighbour)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch, in this process and each worker (default 1, as 'agentreg register'; "
                        "0: torch's choice)")
    add_agent_options(p)
    p.add_argument("--progress-json", action="store_true",
                   help="one JSON progress line per pair on stdout (stage 'register', done/total pairs)")
    p.set_defaults(func=cmd_register_many)

    p = sub.add_parser("evaluate", help="the paper's Table 1 protocol on every ordered pair of the validation subjects")
    p.add_argument("--data", required=True, help="data folder or CSV (e.g. ../shared/data/promise12/grid128)")
    p.add_argument("--split", default=str(repo_file("Resources", "promise12_split.json")),
                   help="split JSON; its 'validation' subjects are evaluated (default: Resources/promise12_split.json)")
    p.add_argument("--dim", type=int, choices=(2, 3), default=3, help="2: middle slice; 3: volumes")
    p.add_argument("--model", help="model bundle for ours/nfc (default: Resources/Models/prostate-<dim>d.pt)")
    p.add_argument("--crop", choices=training_folder.CROPS,
                   help="crop boxes of the methods without a model (default: the model's; without a model, the paper's)")
    p.add_argument("--localiser", help="organ localiser (a file of agentreg localiser, or a model bundle) that "
                                       "places the fixed crops with --crop organ (default: the model's; without one, "
                                       "the fixed label places them: an oracle start)")
    p.add_argument("--out", required=True, help="output folder (per pair and method cache; a rerun resumes)")
    p.add_argument("--report", help="markdown report (default OUT/evaluation.md); the CSV and box plots go beside it")
    p.add_argument("--methods", default="all",
                   help="comma-separated of none,T,localised,e8,e16,ours,nfc,gt (default: all; T for the paper's crops, "
                        "localised for crops on the organ)")
    p.add_argument("--max-pairs", type=int, default=0, help="random subset of at most this many ordered pairs")
    p.add_argument("--pairs", help="explicit pairs MOVING:FIXED,... (instead of all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair subset")
    p.add_argument("--workers", type=int, default=0, help="processes for elastix (default: all cores; itk 1 thread each)")
    p.add_argument("--device", default="auto", help="device of the agent: auto, cpu or cuda")
    p.add_argument("--steps", type=int, help="agent steps (default: the model's; the paper's were 200)")
    p.add_argument("--agent-seed", type=int, default=0, help="seed of the agent's exploration and fuzzy action control")
    p.add_argument("--no-similarity-guard", action="store_true",
                   help="ours / nfc keep the agent's end even when its crops are no more alike than at its start")
    p.add_argument("--no-self-registration", action="store_true",
                   help="skip registering every evaluated subject to itself (with ours, by default: the same file "
                        "and 40 mm away, with and without labels; a table in the report)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per agent batch")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for the agent's torch (default: torch's choice)")
    p.add_argument("--iterations", type=int, default=500, help="elastix iterations per resolution for e8/e16")
    p.add_argument("--gt-iterations", type=int,
                   help="elastix iterations per resolution for gt (default: those of the model's ground truth, with "
                        f"its resolutions; {training_folder.GT_ITERATIONS} x {training_folder.GT_RESOLUTIONS} where "
                        "the model did not record them). gt registers every pair once more with both masks: about as "
                        "long as the ground truth per pair")
    p.add_argument("--gt-metric", choices=training_folder.GT_METRICS,
                   help="metric of the gt reference (default: that of the model's ground truth; points without a model)")
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="register a few real PROMISE12 validation pairs with the shipped 3-D model")
    p.add_argument("--data", default=str(repo_file("..", "shared", "data", "promise12", "grid128")),
                   help="PROMISE12 folder of caseNN_image/caseNN_label files (default: ../shared/data/promise12/grid128)")
    p.add_argument("--model", default=str(repo_file("Resources", "Models", "prostate-3d.pt")),
                   help="model bundle (default: Resources/Models/prostate-3d.pt)")
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--split", default=str(repo_file("Resources", "promise12_split.json")),
                   help="split JSON whose validation subjects are paired")
    p.add_argument("--pairs", type=int, default=3, help="number of validation pairs (default 3)")
    p.add_argument("--steps", type=int, help="agent steps (default: the model's own, chosen on its training pairs)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1, as agentreg register: torch's own choice oversubscribed a "
                        "shared 2-core machine, 17.5 s against 1.7 s a pair; 0: torch's choice)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("info", help="check a model bundle and print its model card")
    p.add_argument("model")
    p.add_argument("--name", help="model name in the card (default: the file name)")
    p.add_argument("--card", help="also write the card to this markdown file")
    p.add_argument("--evaluation", help="JSON beside an 'agentreg evaluate' report made with this model: its table "
                   "goes into the card")
    p.set_defaults(func=cmd_info)
    return parser
