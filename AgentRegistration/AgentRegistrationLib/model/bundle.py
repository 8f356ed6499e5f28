"""The model bundle: one self-describing file with everything registration needs.

It holds the network (configuration and weights), the SDM, the model geometry
(preprocessing), the action step sizes, the fuzzy-action-control and exploration settings,
the training configuration and validation results, a format version and the package version.
It is written with ``torch.save`` from tensors and plain containers only, and read with
``weights_only=True``: loading never unpickles arbitrary objects. Every entry is checked on load;
a wrong or corrupt file raises one ``BundleError`` that says what is wrong.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from AgentRegistrationLib import __version__
from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.core.agent import Agent, AgentSettings, model_defaults
from AgentRegistrationLib.core.bspline import ControlGrid
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.network import DualStreamQNetwork, NetworkConfig
from AgentRegistrationLib.core.sdm import StatisticalDeformationModel

FORMAT = "agentreg-model-bundle"
FORMAT_VERSION = 1


DEFAULT_ORGAN = "organ"
"""What messages call the organ of a model trained without ``--organ``."""
UNNAMED_MODEL_ORGAN = "prostate"
"""The organ of a bundle that records none: those made before the organ was recorded are the prostate models
(``Resources/Models``)."""


class BundleError(ValueError):
    """A model bundle that cannot be used."""


@dataclass
class ModelBundle:
    network: DualStreamQNetwork
    sdm: StatisticalDeformationModel
    geometry: ModelGeometry
    action_steps: np.ndarray  # (d,)
    agent_defaults: dict = field(default_factory=model_defaults)
    training: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    package_version: str = __version__
    localisers: dict = field(default_factory=dict)  # {"2"|"3": organ localiser payload for images of that dimension}
    organ_spread: dict = field(default_factory=dict)  # {"2"|"3": median organ spread of the training subjects}
    organ: str = UNNAMED_MODEL_ORGAN  # the organ's name (agentreg groundtruth/train --organ), in every message

    def organ_words(self, what: str = "") -> str:
        """The organ's name for a message (``"prostate"``, ``"hippocampus"``; ``"organ"`` when not named), followed
        by ``what`` (``organ_words("mask")`` -> ``"prostate mask"``)."""
        return f"{self.organ or DEFAULT_ORGAN} {what}".strip()

    @property
    def dim(self) -> int:
        return self.geometry.dim

    @property
    def groundtruth_metric(self) -> str:
        """The metric of the ground truth the model was trained on (``points``, the paper's, where not recorded)."""
        return (self.training.get("data") or {}).get("groundtruth_metric", "points")

    @property
    def groundtruth_settings(self) -> dict[str, int]:
        """The elastix ``iterations`` and ``resolutions`` of the ground truth the model was trained on, those recorded
        (none in models made before they were)."""
        data = self.training.get("data") or {}
        return {k: int(data[f"groundtruth_{k}"]) for k in ("iterations", "resolutions") if data.get(f"groundtruth_{k}")}

    def agent(self, device: torch.device | str = "cpu") -> Agent:
        """The agent of this bundle on ``device``."""
        return Agent(self.network, self.sdm, self.geometry.size, self.action_steps, device)

    def typical_spread(self, dim: int) -> np.ndarray:
        """The training subjects' median organ spread per axis (physical units) in a ``dim``-D image."""
        if str(dim) not in self.organ_spread:
            raise ValueError(f"this model does not know the organ's typical size in a {dim}-D image")
        return np.asarray(self.organ_spread[str(dim)], dtype=float)

    def agent_settings(self, **overrides) -> AgentSettings:
        """The bundle's agent defaults (k, exploration, steps, stop rule) with the given overrides (``None`` keeps
        the default)."""
        defaults = {k: v for k, v in self.agent_defaults.items()
                    if k in ("fuzzy_k", "exploration", "steps", "stop_when_no_action_helps", "stop_margin")}
        defaults.update({k: v for k, v in overrides.items() if v is not None})
        return AgentSettings(**defaults)

    def to_payload(self) -> dict:
        sdm = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in self.sdm.to_arrays().items()
               if k != "grid_json"}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "network": {"config": self.network.config.to_dict(),
                        "state": {k: v.detach().cpu() for k, v in self.network.state_dict().items()}},
            "sdm": sdm,
            "sdm_grid": {"size": list(self.sdm.grid.size), "spacing": list(self.sdm.grid.spacing),
                         "origin": list(self.sdm.grid.origin)},
            "geometry": {k: (v if v is None or isinstance(v, str) else list(v))
                         for k, v in self.geometry.to_dict().items()},
            "action_steps": torch.from_numpy(np.asarray(self.action_steps, dtype=np.float64)),
            "agent_defaults": dict(self.agent_defaults),
            "training": self.training,
            "validation": self.validation,
            "localisers": dict(self.localisers),
            "organ_spread": {k: [float(x) for x in v] for k, v in self.organ_spread.items()},
            "organ": str(self.organ),
        }

    def save(self, path: str | Path) -> Path:
        buffer = io.BytesIO()
        torch.save(self.to_payload(), buffer)
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def load_bundle(path: str | Path) -> ModelBundle:
    """Load and check a bundle; raises :class:`BundleError` (or ``FileNotFoundError``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model bundle not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise BundleError(f"{path} is not a readable AgentRegistration model bundle ({type(err).__name__}); "
                          "re-download or retrain it") from None
    return bundle_from_payload(payload, str(path))


def bundle_from_payload(payload, source: str = "bundle") -> ModelBundle:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BundleError(f"{source} is not an AgentRegistration model bundle")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{source} has bundle format version {version}; this AgentRegistration "
                          f"({__version__}) reads version {FORMAT_VERSION}: retrain or convert the model")
    try:
        g = payload["sdm_grid"]
        grid = ControlGrid(tuple(int(s) for s in g["size"]), tuple(float(s) for s in g["spacing"]),
                           tuple(float(s) for s in g["origin"]))
        arrays = {k: v.numpy() for k, v in payload["sdm"].items()}
        arrays["grid_json"] = np.array(json.dumps(g))
        sdm = StatisticalDeformationModel.from_arrays(arrays)
        geometry = ModelGeometry.from_dict(payload["geometry"])
        config = NetworkConfig.from_dict(payload["network"]["config"])
        action_steps = payload["action_steps"].numpy()
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise BundleError(f"{source} is incomplete or inconsistent: {err}") from None
    if geometry.control_grid() != grid:
        raise BundleError(f"{source}: the SDM's control grid does not match the model geometry")
    if config.num_actions != 2 * sdm.num_modes or action_steps.shape != (sdm.num_modes,):
        raise BundleError(f"{source}: {config.num_actions} network outputs and {action_steps.shape} action steps "
                          f"do not match the SDM's {sdm.num_modes} modes")
    if tuple(config.input_size) != tuple(geometry.size):
        raise BundleError(f"{source}: the network input {config.input_size} does not match the model grid {geometry.size}")
    network = DualStreamQNetwork(config)
    try:
        network.load_state_dict(payload["network"]["state"])
    except (RuntimeError, KeyError) as err:
        raise BundleError(f"{source}: the network weights do not fit the {config.architecture} architecture ({err})") from None
    network.eval()
    localisers = dict(payload.get("localisers", {}))
    if not all(isinstance(v, dict) and {"config", "state"} <= set(v) for v in localisers.values()):
        raise BundleError(f"{source}: its organ localiser is incomplete (no config or weights); retrain the model")
    return ModelBundle(network, sdm, geometry, action_steps, dict(payload.get("agent_defaults", {})),
                       dict(payload.get("training", {})), dict(payload.get("validation", {})),
                       str(payload.get("package_version", "unknown")), localisers,
                       dict(payload.get("organ_spread", {})), str(payload.get("organ", UNNAMED_MODEL_ORGAN)))


PROJECT_SPLIT = "Resources/promise12_split.json"  # the project's PROMISE12 split, as a model records it


LOCALISER_WEIGHTING_TEXT = {"p": "the moments of p", "p2": "the moments of p squared",
                            "largest": "the moments of its largest p > 0.5 component", "ellipsoid": "the fitted ellipsoid"}
"""How each localiser weighting (``training_folder.LOCALISER_WEIGHTINGS``) turns its probability map p into a centre and
a size."""
