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
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .agent import Agent, AgentSettings, model_defaults
from .bspline import ControlGrid
from .files import atomic_write
from .geometry import ModelGeometry
from .network import DualStreamQNetwork, NetworkConfig
from .sdm import StatisticalDeformationModel

FORMAT = "agentreg-model-bundle"
FORMAT_VERSION = 1


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

    @property
    def dim(self) -> int:
        return self.geometry.dim

    @property
    def groundtruth_metric(self) -> str:
        """The metric of the ground truth the model was trained on (``points``, the paper's, where not recorded)."""
        return (self.training.get("data") or {}).get("groundtruth_metric", "points")

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
                       dict(payload.get("organ_spread", {})))


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but no CUDA GPU is available to torch here: use --device cpu (or auto)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def cpu_name() -> str:
    """The CPU's model name (from ``/proc/cpuinfo``; elsewhere the platform's processor or machine name)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The hardware behind ``device``, for records and reports: the GPU's name for CUDA, else the CPU's."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


PROJECT_SPLIT = "Resources/promise12_split.json"  # the project's PROMISE12 split, as a model records it


def _project_split_subjects(subset: str) -> list[str] | None:
    """The ``subset`` subjects of the project's PROMISE12 split, where this copy of the engine can find the file."""
    for root in Path(__file__).resolve().parents[1:3]:  # installed layout, source tree
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


LOCALISER_WEIGHTINGS = {"p": "the moments of p", "p2": "the moments of p squared",
                        "largest": "the moments of its largest p > 0.5 component", "ellipsoid": "the fitted ellipsoid"}
"""How each localiser weighting (``localiser.WEIGHTINGS``) turns its probability map p into a centre and a size."""


def _localisers_text(bundle: ModelBundle) -> str:
    if not bundle.localisers:
        return "this model has none"
    how = []
    for dim, payload in sorted(bundle.localisers.items()):
        weighting = payload["config"].get("weighting", "p2")
        finer = ", looking again at a finer grid around its first answer" if payload["config"].get("refine") else ""
        how.append(f"{LOCALISER_WEIGHTINGS.get(weighting, weighting)}{finer} ({dim}-D)")
    return (f"for {' and '.join(sorted(bundle.localisers))}-D images; centre and size from its probability map by "
            + "; ".join(how))


def model_card(bundle: ModelBundle, name: str, evaluation: dict | None = None) -> str:
    """A markdown model card: data, split, configuration, training time and device, validation.

    The data are those the model's training recorded (data folder, ground-truth folder, how the subjects were
    chosen); PROMISE12 and the project's split are named only for a model trained on them.
    ``evaluation``: the JSON summary of ``agentreg evaluate`` with this model (and its ``source`` path),
    shown as the validation table."""
    t, v = bundle.training, bundle.validation
    config = t.get("config", {})
    promise12 = trained_on_promise12(t)
    organ = "prostate" if promise12 else "organ"
    size_mb = sum(p.numel() * p.element_size() for p in bundle.network.state_dict().values()) / 2**20
    lines = [
        f"# Model card: {name}",
        "",
        f"- **Task**: {bundle.dim}-D inter-subject non-rigid registration "
        + ("of prostate T2w MR" if promise12 else "of images like its training data (below)")
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
        f"- **Training configuration** `{config.get('name', '?')}`: " + ", ".join(f"{k}={val}" for k, val in config.items()),
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
                  "| method | Dice median | Dice mean | Hausdorff median (voxels) | % folding | seconds per pair |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for m in evaluation["methods"]:
            lines.append(f"| {m} | {s[m]['dice']['median']:.3f} | {s[m]['dice']['mean']:.3f} | "
                         f"{s[m]['hausdorff']['median']:.1f} | {s[m]['folding_percent']['mean']:.2f} | "
                         f"{s[m]['seconds']['mean']:.2f} |")
    lines += ["", "Full evaluation (Table 1 protocol): see `results/`." if promise12 else
              "Evaluate it on pairs of subjects it was not trained on with `agentreg evaluate --model MODEL --data DATA "
              "--split SPLIT` (the paper's Table 1 protocol on the split's 'validation' subjects).", ""]
    return "\n".join(lines)
