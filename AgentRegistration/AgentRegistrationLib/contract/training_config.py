"""Training configurations, defined once: the fields of a training run (saved in every checkpoint and model bundle),
the named configurations ``agentreg train --config`` and the training module offer, and their one-line descriptions
(the option's help and the module's tooltip). Standard library only."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class TrainingConfig:
    name: str = "compact"
    architecture: str = "compact"
    batch_size: int = 0  # 0: the paper's 65 (2-D) / 30 (3-D)
    learning_rate: float = 1e-3
    lr_decay: float = 0.8
    lr_decay_every: int = 10_000
    iterations: int = 20_000
    intra_probability: float = 0.5
    draw_scale: float = 0.5  # synthetic draws: sigma x draw_scale per mode (keeps the negated inverse accurate)
    step_fraction: float = 0.25  # action step of mode m = step_fraction * mean |theta_m| of the real pairs
    state_sampling: float = 0.0  # fraction of a batch in states along the way to theta_gt (0: all at the start)
    near_gt_sampling: float = 0.0  # fraction of a batch in states within half a step of theta_gt in every mode
    wander_sampling: float = 0.0  # fraction of a batch in states off the way, where a drifting agent goes
    wander_steps: float = 4.0  # the most noise of a state off the way, in action steps per mode
    target_units: str = "paper"  # Eq. 1 as written ("paper") or per mode in units of its action step ("steps")
    augment: float = 0.0  # fraction of training images given random intensity changes (synthetic.augment_intensity)
    new_subjects: float = 0.0  # fraction of intra-subject pairs made from a virtual subject (SyntheticPairGenerator)
    aligned: float = 0.0  # fraction of intra-subject pairs with no synthetic difference: aligned, every move worse
    stop_rule: int = 0  # 1: the bundle's agent stops a pair when no action is predicted to help (steps = a cap)
    validate_every: int = 1000
    validation_pairs: int = 8
    validation_steps: int = 100
    checkpoint_every: int = 200
    seed: int = 0

    def batch(self, dim: int) -> int:
        return self.batch_size or (65 if dim == 2 else 30)

    def with_overrides(self, overrides: list[str]) -> TrainingConfig:
        """``["key=value", ...]`` with each value converted to the field's type (checked)."""
        types = {f.name: f.type for f in dataclasses.fields(self)}
        changes = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or key not in types:
                raise ValueError(f"bad training override {item!r}: use key=value with key one of {sorted(types)}")
            kind = {"int": int, "float": float, "str": str}[types[key]]
            try:
                changes[key] = kind(value)
            except ValueError:
                raise ValueError(f"training override {key}={value!r}: expected a {types[key]}") from None
        return dataclasses.replace(self, **changes)


_NAMED = (
    (TrainingConfig(name="compact", architecture="compact", state_sampling=0.5),
     "the smaller network; no stop rule"),
    (TrainingConfig(name="paper", architecture="paper", iterations=100_000),
     "the paper's network and training, Krebs et al. 2017 as published; no stop rule"),
    # compact, plus what teaches convergence: targets per mode in step units, states near the GT, a stop rule
    (TrainingConfig(name="converge", architecture="compact", state_sampling=0.4, near_gt_sampling=0.25,
                    target_units="steps", stop_rule=1),
     "compact, plus targets per mode in steps, states near the answer and a stop rule; the shipped models'"),
    # converge, plus states off the way to the GT, from which the targets teach the way back (the agents of
    # converge drift away from the answer on pairs they were trained on, into states they never saw)
    (TrainingConfig(name="recover", architecture="compact", state_sampling=0.4, near_gt_sampling=0.25,
                    wander_sampling=0.3, target_units="steps", stop_rule=1),
     "converge, plus training states off the way to the answer"),
)
CONFIGS = {config.name: config for config, _ in _NAMED}
"""The named training configurations (``agentreg train --config``)."""
TRAINING_CONFIGURATIONS = tuple(CONFIGS)
"""Their names, in the order the training module lists them."""
DEFAULT_TRAINING_CONFIGURATION = "converge"
"""The configuration ``agentreg train`` and the training module use unless told otherwise (the shipped models')."""
CONFIGURATION_NOTES = {config.name: note for config, note in _NAMED}
"""What each named configuration is, in a few words."""


def config_by_name(name: str) -> TrainingConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown training configuration {name!r}; choose one of {sorted(CONFIGS)}")
    return CONFIGS[name]


def configurations_text() -> str:
    """Every named configuration with its note, the default marked: ``agentreg train --config``'s help and the
    training module's tooltip."""
    described = [f"{name} ({note}{'; the default' if name == DEFAULT_TRAINING_CONFIGURATION else ''})"
                 for name, note in CONFIGURATION_NOTES.items()]
    return ", ".join(described[:-1]) + " or " + described[-1]
