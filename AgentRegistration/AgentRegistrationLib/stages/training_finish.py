"""What ``agentreg train`` adds to a trained network's bundle before its one save (:func:`finish_bundle`): where its
validation pairs came from, its default number of agent steps and stop margin, chosen on real pairs of its training
subjects (:func:`choose_steps`), and, for a model that crops on the organ, its organ localisers and the organ's typical
size (:func:`add_localisation`); and what ``agentreg train`` says of the result (:func:`training_text`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from AgentRegistrationLib.contract.paths import recorded_path
from AgentRegistrationLib.contract.training_config import TrainingConfig
from AgentRegistrationLib.core.agent import STOP_MARGINS, choose_stop_margin
from AgentRegistrationLib.model.bundle import DEFAULT_ORGAN, ModelBundle
from AgentRegistrationLib.stages.training_set import TrainingSet


def finish_bundle(bundle: ModelBundle, training_set: TrainingSet, *, step_pairs: int, device: torch.device,
                  localisers: list[str] | None = None, data: str | Path | None = None, split: str | Path | None = None,
                  on_step_choice: Callable[[int], None] | None = None, organ: str | None = None) -> str | None:
    """Make the bundle of :func:`.training.train` the model ``agentreg train`` saves: its validation records ``data``
    and ``split``; with ``step_pairs``, its default steps (and stop margin) are chosen on that many real training
    pairs (``on_step_choice(pairs)`` first); a model that crops on the organ gets ``localisers`` and the organ spread
    of the training subjects in ``data``. ``organ``: the organ's name (default: the ground truth's ``--organ``, else
    :data:`bundle.DEFAULT_ORGAN`). Returns a note for the user, or ``None``; saves nothing."""
    bundle.organ = organ or training_set.source.get("organ") or DEFAULT_ORGAN
    if bundle.validation:
        bundle.validation.update(data=recorded_path(data), split=recorded_path(split))
    if step_pairs:
        if on_step_choice is not None:
            on_step_choice(min(step_pairs, len(training_set.pairs)))
        bundle.training["step_choice"] = choose_steps(bundle, training_set, step_pairs, device=device)
    if bundle.geometry.localised:
        return add_localisation(bundle, localisers, data, training_set.names)
    return None


NO_VALIDATION = "no validation (give --data and --split for validation on real pairs)"


def validation_text(validation: dict) -> str:
    """A bundle's validation in words (``agentreg train``'s last line)."""
    if not validation:
        return NO_VALIDATION
    return (f"validation on {len(validation.get('pairs', []))} real pairs of the validation subjects "
            f"({validation.get('steps')} steps): Dice median {validation['dice_before_median']:.3f} -> "
            f"{validation['dice_median']:.3f}, mean {validation['dice_before_mean']:.3f} -> {validation['dice_mean']:.3f}")


def training_text(config: TrainingConfig, bundle: ModelBundle, out: str | Path) -> str:
    """What ``agentreg train`` says at the end: the run, its validation and the model's agent defaults."""
    t = bundle.training
    steps = bundle.agent_defaults["steps"]
    return (f"trained {config.name} ({config.architecture}) for {t['iterations']} batches in {t['seconds'] / 60:.1f} min "
            f"on {t['device']}" + (f", fine-tuning {t['initialised_from']['model']}" if t.get("initialised_from") else "")
            + f"; final loss {t['final_loss']:.4g}, held-out best-action accuracy "
            f"{t['held_out_accuracy']:.2f} (chance {t['chance_accuracy']:.3f}); {validation_text(bundle.validation)}; "
            f"default {steps} agent steps"
            + (f" (best on {t['step_choice']['pairs']} training pairs)" if "step_choice" in t else "")
            + (", stop rule on" if bundle.agent_defaults.get("stop_when_no_action_helps") else ", no stop rule")
            + f"; saved {out}")


def add_localisation(bundle: ModelBundle, localisers: list[str] | None, data: str | None,
                     names: list[str]) -> str | None:
    """Give a model that crops on the organ what it needs to place the fixed crop: organ localisers (files of
    ``agentreg localiser``, one per image dimension) and the training subjects' median organ spread (for a
    point placed by hand); the caller saves it. Returns a note for the user when it has no localiser."""
    # SimpleITK (the training labels are read again): only for models that crop on the organ
    from AgentRegistrationLib.data.dataset import find_subjects
    from AgentRegistrationLib.data.image_io import read_label
    from AgentRegistrationLib.data.localiser import load_localiser, localiser_to_payload
    from AgentRegistrationLib.data.organ_box import localisation_from_label

    for path in localisers or []:
        localiser = load_localiser(path)
        bundle.localisers[str(localiser.config.dim)] = localiser_to_payload(localiser)
    if data:
        spreads = np.array([localisation_from_label(read_label(s.label)).spread for s in find_subjects(data, names)])
        if spreads.shape[1] == 3:
            bundle.organ_spread = {"3": np.median(spreads, 0).tolist(), "2": np.median(spreads[:, :2], 0).tolist()}
        else:
            bundle.organ_spread = {"2": np.median(spreads, 0).tolist()}
    if not localisers:
        return ("note: this model crops on the organ but has no localiser: users must place the fixed crop with a "
                "point (--fixed-point); add one with --localiser")
    return None


@torch.no_grad()
def choose_steps(bundle: ModelBundle, training_set: TrainingSet, pairs: int, max_steps: int = 200,
                 seed: int = 1, device: torch.device | str = "cpu", batch: int = 16) -> dict:
    """A new model's default number of agent steps: the step count (1 to ``max_steps``) with the best mean Dice on
    ``pairs`` random real GT pairs of its training subjects (never a validation subject), the agent run with the
    model's settings but without its stop rule, so that every step is measured (as
    ``scripts/experiments/steps_on_training_pairs.py`` chose the shipped models' steps). Sets the bundle's default (it does not
    save it) and returns ``{"steps", "pairs", "max_steps", "seed", "dice_mean_by_step"}``."""
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(training_set.pairs), size=min(pairs, len(training_set.pairs)), replace=False))
    agent = bundle.agent(device)
    settings = bundle.agent_settings(steps=max_steps, seed=0, stop_when_no_action_helps=False)
    dice, best_q = [], []
    for first in range(0, len(chosen), batch):
        moving, fixed = zip(*[training_set.pairs[i] for i in chosen[first:first + batch]], strict=True)
        take = lambda array, index: torch.as_tensor(array[list(index)])[:, None]  # noqa: E731
        moving_label, fixed_label = take(training_set.labels, moving), take(training_set.labels, fixed)
        result = agent.run(take(training_set.images, fixed), take(training_set.images, moving), settings,
                           moving_label, fixed_label)
        start_dice = agent.start_dice(moving_label, fixed_label)
        dice.append(torch.cat([start_dice[None], torch.stack(result.trajectory.dice)]).cpu().numpy())  # (1 + steps, B)
        best_q.append(result.trajectory.best_allowed_q().cpu().numpy())
    dice, best_q = np.concatenate(dice, axis=1), np.concatenate(best_q, axis=1)
    mean = dice[1:].mean(axis=1)
    best = int(mean.argmax()) + 1
    bundle.agent_defaults["steps"] = best
    bundle.agent_defaults["steps_chosen_by"] = (
        f"the best mean Dice over 1 to {max_steps} steps on {len(chosen)} real pairs of training subjects, chosen by "
        "'agentreg train'; the paper used 200")
    choice = {"steps": best, "pairs": len(chosen), "max_steps": max_steps, "seed": seed,
              "dice_mean_by_step": [float(x) for x in mean]}
    if bundle.agent_defaults.get("stop_when_no_action_helps"):
        margin = choose_stop_margin(best_q, dice, max_steps)
        bundle.agent_defaults["stop_margin"] = margin
        bundle.agent_defaults["stop_margin_chosen_by"] = (
            f"the best mean Dice at {max_steps} steps on the same pairs among {list(STOP_MARGINS)}")
        choice["stop_margin"] = margin
    return choice
