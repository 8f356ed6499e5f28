"""The model card: a markdown description of a bundle (training data, split, localisers, evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

from AgentRegistrationLib.model.bundle import DEFAULT_ORGAN, LOCALISER_WEIGHTING_TEXT, PROJECT_SPLIT, ModelBundle


def _project_split_subjects(subset: str) -> list[str] | None:
    """The ``subset`` subjects of the project's PROMISE12 split, where this copy of the engine can find the file."""
    for root in Path(__file__).resolve().parents[2:4]:  # installed layout, source tree
        path = root / PROJECT_SPLIT
        if path.is_file():
            try:
                return list(json.loads(path.read_text())[subset])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def trained_on_promise12(training: dict) -> bool:
    """Whether a model was trained on the project's PROMISE12 split: recorded so, or (a model that predates the
    record, as the shipped ones) its training subjects are exactly the split's training subjects."""
    data = training.get("data")
    if data is not None:
        return data.get("split") == PROJECT_SPLIT
    subjects = training.get("subjects")
    return bool(subjects) and sorted(subjects) == sorted(_project_split_subjects("train") or [])


def _data_line(t: dict) -> str:
    """The card's description of the data a model was trained on, as its training recorded it."""
    subjects = t.get("subjects", [])
    counted = f"({len(subjects)} subjects, {t.get('real_pairs', '?')} real GT pairs)"
    data = t.get("data")
    if data is None:  # a model made before the data was recorded
        if trained_on_promise12(t):
            return (f"PROMISE12 (shared `grid128`), training subjects {', '.join(subjects)} {counted}; split "
                    f"`{PROJECT_SPLIT}`.")
        return (f"training subjects {', '.join(subjects)} {counted}; where they came from (data folder, split) was "
                "not recorded in this model.")
    selection = data.get("selection")
    chosen = {"split": f"the '{data.get('subset', 'train')}' subjects of the split `{data.get('split')}`",
              "subjects": "subjects given with --subjects", "all": "every subject of the data folder"}.get(selection)
    text = ("PROMISE12: " if data.get("split") == PROJECT_SPLIT else "") + f"training subjects {', '.join(subjects)} {counted}"
    text += f", {chosen}" if chosen else ""
    text += f", from `{data['data']}`" if data.get("data") else ""
    if data.get("groundtruth"):
        metric = f", metric `{data['groundtruth_metric']}`" if data.get("groundtruth_metric") else ""
        text += f" (ground truth `{data['groundtruth']}`{metric})"
    missing = [what for what, known in (("the data folder", data.get("data")), ("how the subjects were chosen", chosen))
               if not known]
    return text + "." + (f" Not recorded in this model: {' and '.join(missing)}." if missing else "")


def _localisers_text(bundle: ModelBundle) -> str:
    if not bundle.localisers:
        return "this model has none"
    how = []
    for dim, payload in sorted(bundle.localisers.items()):
        weighting = payload["config"].get("weighting", "p2")
        finer = ", looking again at a finer grid around its first answer" if payload["config"].get("refine") else ""
        how.append(f"{LOCALISER_WEIGHTING_TEXT.get(weighting, weighting)}{finer} ({dim}-D)")
    return (f"for {' and '.join(sorted(bundle.localisers))}-D images; centre and size from its probability map by "
            + "; ".join(how))


def config_text(config: dict, dim: int) -> str:
    """A training configuration as the card lists it, the batch size as trained (``batch_size`` 0 stands for the
    paper's: :meth:`TrainingConfig.batch`)."""
    shown = dict(config)
    if not shown.get("batch_size"):
        shown["batch_size"] = f"{65 if dim == 2 else 30} (the paper's)"
    return ", ".join(f"{k}={val}" for k, val in shown.items())


def model_card(bundle: ModelBundle, name: str, evaluation: dict | None = None) -> str:
    """A markdown model card: data, split, configuration, training time and device, validation.

    The data are those the model's training recorded (data folder, ground-truth folder, how the subjects were
    chosen); PROMISE12 and the project's split are named only for a model trained on them.
    ``evaluation``: the JSON summary of ``agentreg evaluate`` with this model (and its ``source`` path),
    shown as the validation table."""
    t, v = bundle.training, bundle.validation
    config = t.get("config", {})
    promise12 = trained_on_promise12(t)
    organ = bundle.organ_words()
    size_mb = sum(p.numel() * p.element_size() for p in bundle.network.state_dict().values()) / 2**20
    lines = [
        f"# Model card: {name}",
        "",
        f"- **Task**: {bundle.dim}-D inter-subject non-rigid registration "
        + ("of prostate T2w MR" if promise12 and organ == "prostate" else
           f"of {organ} images like its training data (below)")
        + " (Krebs et al., MICCAI 2017).",
        f"- **Network**: dual-stream Q-network, architecture `{bundle.network.config.architecture}`, "
        f"{sum(p.numel() for p in bundle.network.parameters()):,} parameters ({size_mb:.1f} MB of weights).",
        f"- **SDM**: {bundle.sdm.num_modes} PCA modes of B-spline coefficients (control grid {bundle.sdm.grid.size}, "
        f"spacing {bundle.sdm.grid.spacing} model voxels), {100 * bundle.sdm.explained_variance_ratio.sum():.1f} % of the "
        "variance of the real GT deformations; "
        f"{2 * bundle.sdm.num_modes} actions, step = {config.get('step_fraction', '?')} x mean |theta| per mode.",
        f"- **Model grid**: {list(bundle.geometry.size)} voxels, "
        + (f"each image's crop box centred on its {organ} and spanning {list(bundle.geometry.box_spreads)} standard "
           "deviations of it per axis (placed by the moving label, a point, or the model's localiser: "
           + _localisers_text(bundle)
           + ")." if bundle.geometry.localised else
           f"crop box {list(bundle.geometry.crop_fraction)} of the fixed image's extent, centred, after elastix "
           "translation pre-alignment.") + f" Model {bundle.geometry.description()}.",
        f"- **Data**: {_data_line(t)}",
        f"- **Organ**: {organ} (" + ("recorded by agentreg groundtruth/train --organ" if bundle.organ != DEFAULT_ORGAN
                                     else "not named: train with --organ NAME") + ").",
        f"- **Training configuration** `{config.get('name', '?')}`: " + config_text(config, bundle.dim),
        f"- **Training**: {t.get('iterations', '?')} batches in {t.get('seconds', 0) / 60:.1f} min on {t.get('device', '?')}"
        + (f", fine-tuning `{Path(t['initialised_from']['model']).name}` ({t['initialised_from'].get('config')}, "
           f"{t['initialised_from'].get('iterations')} batches)" if t.get("initialised_from") else "") + "; "
        f"final loss {t.get('final_loss', float('nan')):.4g}; best-action accuracy on held-out synthetic pairs "
        f"{t.get('held_out_accuracy', float('nan')):.2f} (chance {t.get('chance_accuracy', float('nan')):.3f})"
        + (f"; right stop decision at held-out states within half a step of the answer "
           f"{t['held_out_near_gt_accuracy']:.2f}." if t.get("held_out_near_gt_accuracy") is not None else "."),
        f"- **Fuzzy action control**: k = {bundle.agent_defaults.get('fuzzy_k')}; exploration probability "
        f"{bundle.agent_defaults.get('exploration')}; {bundle.agent_defaults.get('steps')} steps"
        + (f" ({bundle.agent_defaults['steps_chosen_by']})" if bundle.agent_defaults.get("steps_chosen_by") else "")
        + ("; stop rule on (a pair stops once no action is predicted to help"
           + (f" by more than {bundle.agent_defaults['stop_margin']:g}" if bundle.agent_defaults.get("stop_margin")
              else "")
           + (f", the margin with {bundle.agent_defaults['stop_margin_chosen_by']}"
              if bundle.agent_defaults.get("stop_margin_chosen_by") else "") + "; the steps are a cap)."
           if bundle.agent_defaults.get("stop_when_no_action_helps") else "."),
        f"- **Package version**: {bundle.package_version}.",
    ]
    if v:
        lines.append(
            f"- **Validation of the saved model** ({len(v.get('pairs', []))} real validation pairs "
            + (f"of the 'validation' subjects of `{v['split']}` in `{v['data']}`, " if v.get("split") else "")
            + (f"each on its own {organ}'s box, placed by the labels, " if bundle.geometry.localised else
               "on the common template grid, ") +
            f"{v.get('steps')} steps): Dice median {v.get('dice_before_median', float('nan')):.3f} -> "
            f"{v.get('dice_median', float('nan')):.3f}, mean {v.get('dice_before_mean', float('nan')):.3f} -> "
            f"{v.get('dice_mean', float('nan')):.3f}.")
    if evaluation:
        s = evaluation["summary"]
        lines += ["", f"## Validation: the paper's Table 1 protocol on {len(evaluation['pairs'])} ordered pairs of the "
                  f"validation subjects (`{evaluation['source']}`)", "",
                  "| method | Dice median (model grid) | Dice mean (model grid) | Dice median (fixed image's space) "
                  "| Hausdorff median (model-grid voxels) | % folding | seconds per pair |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for m in evaluation["methods"]:
            fixed = s[m].get("dice_fixed", {"n": 0})
            lines.append(f"| {m} | {s[m]['dice']['median']:.3f} | {s[m]['dice']['mean']:.3f} | "
                         + (f"{fixed['median']:.3f}" if fixed["n"] else "not measured") + " | "
                         f"{s[m]['hausdorff']['median']:.1f} | {s[m]['folding_percent']['mean']:.2f} | "
                         f"{s[m]['seconds']['mean']:.2f} |")
    lines += ["", "Full evaluation (Table 1 protocol): see `results/`." if promise12 else
              "Evaluate it on pairs of subjects it was not trained on with `agentreg evaluate --model MODEL --data DATA "
              "--split SPLIT` (the paper's Table 1 protocol on the split's 'validation' subjects).", ""]
    return "\n".join(lines)
