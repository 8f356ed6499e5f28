"""Supervised training of the dual-stream Q-network by Eq. 1 (paper, 2.1 and 3).

Mini-batches of synthetic intra- and inter-subject pairs are made online on the training
device; the loss is the sum over actions of squared differences between predicted and Eq. 1
Q-values (averaged over the batch). RMSprop, learning rate 1e-3 decayed by 0.8 every 10k
batches, batch 65 (2-D) / 30 (3-D), as in the paper; all overridable. Periodically the agent
runs on real validation pairs and its Dice is reported. Checkpoints hold model, optimizer,
scheduler, step, history and config; a rerun resumes from them. Under ``torchrun`` (``RANK``
set) it trains with DistributedDataParallel; only rank 0 writes.

What it trains on: :mod:`.training_set`; its configurations: :mod:`..contract.training_config`; what ``agentreg
train`` adds to the trained bundle before saving it: :mod:`.training_finish`.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from AgentRegistrationLib.contract.files import atomic_write
from AgentRegistrationLib.contract.training_config import TrainingConfig
from AgentRegistrationLib.contract.training_folder import LOSS_COLUMNS
from AgentRegistrationLib.core.agent import Agent, AgentSettings, model_defaults
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.metrics import dice_batch
from AgentRegistrationLib.core.network import DualStreamQNetwork, NetworkConfig
from AgentRegistrationLib.core.sdm import StatisticalDeformationModel
from AgentRegistrationLib.core.synthetic import SyntheticPairGenerator, augment_intensity, q_targets
from AgentRegistrationLib.core.warp import warp
from AgentRegistrationLib.model.bundle import ModelBundle, bundle_from_payload, load_bundle
from AgentRegistrationLib.model.devices import device_record
from AgentRegistrationLib.stages.training_set import TrainingSet, ValidationPair


def _distributed() -> tuple[int, int]:
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def action_steps_for(sdm: StatisticalDeformationModel, config: TrainingConfig) -> np.ndarray:
    return np.asarray(sdm.mean_abs, dtype=np.float64) * config.step_fraction


def train(
    config: TrainingConfig,
    training_set: TrainingSet,
    sdm: StatisticalDeformationModel,
    geometry: ModelGeometry,
    device: torch.device,
    checkpoint: Path | None = None,
    validation: list[ValidationPair] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    time_limit: float | None = None,
    init: Path | None = None,
) -> ModelBundle:
    """Train (or resume from ``checkpoint``) and return the model bundle, validated on ``validation`` (rank 0); the
    caller saves it. A new run starts from the network of the model bundle ``init`` when given (fine-tuning), else
    from random weights.

    With ``time_limit`` (seconds of this call), training stops after the iteration that passes it,
    checkpoints, and returns the bundle of that iteration; the checkpoint resumes it later.
    """
    rank, world = _distributed()
    if time_limit is not None and world > 1:
        raise ValueError("a training time limit is for one process; under torchrun give the number of iterations instead")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(config.seed + rank)
    sdm.check_grid(geometry.control_grid())
    if training_set.images.shape[1:] != geometry.array_shape:
        raise ValueError(f"training images are {training_set.images.shape[1:]} but the model grid is {geometry.array_shape}")
    run = _TrainingRun(config, training_set, sdm, geometry, device, rank, world)
    run.resume(checkpoint)
    if init is not None and run.start == 0:
        run.initialise(Path(init))
    run.loop(checkpoint, validation, progress, time_limit)
    bundle = run.bundle()
    if validation and rank == 0:
        # The bundle's validation is measured on the network as saved and reloaded, as users will run it.
        bundle.validation = validate_bundle(bundle, validation, config)
    run.network.to(device)
    return bundle


class _TrainingRun:
    """The state of one :func:`train` call and its steps: the network, agent, synthetic pair generators, held-out
    set and optimiser (:meth:`__init__`), going on from a checkpoint (:meth:`resume`), the iterations
    (:meth:`loop`, :meth:`step`, :meth:`log`, :meth:`save_checkpoint`) and the model bundle (:meth:`bundle`)."""

    def __init__(self, config: TrainingConfig, training_set: TrainingSet, sdm: StatisticalDeformationModel,
                 geometry: ModelGeometry, device: torch.device, rank: int, world: int):
        self.config, self.training_set, self.sdm, self.geometry = config, training_set, sdm, geometry
        self.device, self.rank, self.world = device, rank, world
        self.net_config = NetworkConfig(config.architecture, geometry.dim, tuple(geometry.size), 2 * sdm.num_modes)
        self.network = DualStreamQNetwork(self.net_config).to(device)
        self.action_steps = action_steps_for(sdm, config)
        self.agent = agent = Agent(self.network, sdm, geometry.size, self.action_steps, device)
        self.q_scale = float((agent.action_steps**2).mean()) if config.target_units == "paper" else 1.0
        real_theta = sdm.project(training_set.coefficients)
        images = torch.as_tensor(training_set.images, device=device)[:, None]
        labels = torch.as_tensor(training_set.labels, device=device)[:, None]
        self.generator = SyntheticPairGenerator(
            images, labels, training_set.pairs, real_theta, sdm, agent.mode_fields, agent.theta_start,
            config.intra_probability, config.draw_scale,
            torch.Generator(device=device).manual_seed(config.seed * 1000 + rank), config.new_subjects, config.aligned)
        held_out = SyntheticPairGenerator(
            images, labels, training_set.pairs, real_theta, sdm, agent.mode_fields, agent.theta_start,
            config.intra_probability, config.draw_scale, torch.Generator(device=device).manual_seed(987654))
        with torch.no_grad():  # the held-out synthetic pairs: from the start, and near the GT
            self.h_fixed, self.h_moving, htheta, _ = held_out.sample(64)
            self.h_target = self.targets(htheta, agent.theta_start.expand(64, -1))
            h_near_theta, self.h_near_moving = states_along_the_way(
                agent, held_out.gen, agent.theta_start.expand(64, -1), htheta, self.h_moving, 0.0, near_gt=1.0)
            self.h_near_target = self.targets(htheta, h_near_theta)
        self.model = self.network
        if world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.RMSprop(self.model.parameters(), lr=config.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=config.lr_decay_every,
                                                         gamma=config.lr_decay)
        self.start, self.history, self.seconds, self.last = 0, [], 0.0, config.iterations
        self.trained_on: str | None = None  # where the batches ran ("..., then ..." when resumed elsewhere)
        self.initialised_from: dict | None = None  # the model a fine-tuning run started from

    def targets(self, theta_gt: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Eq. 1 of the state ``theta`` towards ``theta_gt``, in the configuration's units."""
        return q_targets(theta_gt, theta, self.agent.deltas, self.config.target_units) / self.q_scale

    def resume(self, checkpoint: Path | None) -> None:
        """Go on from ``checkpoint`` when it exists (made with the same configuration but, maybe, fewer
        iterations)."""
        if checkpoint is None or not Path(checkpoint).is_file():
            return
        config, generator = self.config, self.generator
        state = torch.load(checkpoint, map_location=self.device, weights_only=True)
        defaults = {f.name: f.default for f in dataclasses.fields(TrainingConfig)}  # fields newer than the checkpoint
        changed = sorted(k for k, v in dataclasses.asdict(config).items()  # a resumed run may be made longer
                         if k != "iterations" and state["config"].get(k, defaults[k]) != v)
        if changed:
            raise ValueError(f"checkpoint {checkpoint} was made with another training configuration ({', '.join(changed)} "
                             "differ); use the same configuration to resume, or another checkpoint path to start over")
        self.network.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["generator"].numel() == generator.gen.get_state().numel():
            generator.gen.set_state(state["generator"].cpu())
        else:  # made on another kind of device: its generator state does not fit this device's generator
            generator.gen.manual_seed(config.seed * 1000 + self.rank + int(state["iteration"]))
        self.start, self.history = int(state["iteration"]), [list(h) for h in state["history"]]
        self.seconds = float(state["seconds"])
        self.trained_on = state.get("device")  # absent from checkpoints older than this record
        self.initialised_from = state.get("initialised_from")

    def initialise(self, init: Path) -> None:
        """Start from the network of the model bundle ``init``: the same architecture, model grid and SDM."""
        bundle = load_bundle(init)
        if bundle.network.config != self.net_config:
            raise ValueError(f"--init {init}: its network ({bundle.network.config}) is not this training's "
                             f"({self.net_config}); fine-tuning needs the same architecture, model grid and number "
                             "of SDM modes")
        if bundle.sdm.modes.shape != self.sdm.modes.shape or not np.allclose(bundle.sdm.modes, self.sdm.modes):
            raise ValueError(f"--init {init}: that model was trained on another SDM; give its SDM (--sdm) to "
                             "fine-tune it")
        self.network.load_state_dict(bundle.network.state_dict())
        self.initialised_from = {"model": str(init), "iterations": bundle.training.get("iterations"),
                                 "config": bundle.training.get("config", {}).get("name")}

    def save_checkpoint(self, checkpoint: Path | None, iteration: int) -> None:
        """The checkpoint (model, optimiser, scheduler, generator, history) and ``loss.csv`` beside it; rank 0."""
        if checkpoint is None or self.rank != 0:
            return
        state = {"config": dataclasses.asdict(self.config), "model": self.network.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "generator": self.generator.gen.get_state(), "iteration": iteration, "history": self.history,
                 "seconds": self.seconds, "device": self.trained_on, "initialised_from": self.initialised_from}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(checkpoint, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
        self.save_loss(checkpoint)

    def save_loss(self, checkpoint: Path | None) -> None:
        """The history as ``loss.csv`` beside the checkpoint; rank 0."""
        if checkpoint is None or self.rank != 0:
            return
        width = len(LOSS_COLUMNS)  # rows of a run resumed from an older checkpoint lack the last columns
        lines = [",".join(LOSS_COLUMNS)] + [",".join(f"{v:.6g}" for v in [*h, *[math.nan] * (width - len(h))])
                                             for h in self.history]
        atomic_write(Path(checkpoint).with_name("loss.csv"), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))

    def step(self, batch: int) -> float:
        """One batch of synthetic pairs (in states along the way as configured), one optimiser step; its loss."""
        config, agent = self.config, self.agent
        with torch.no_grad():
            fixed, moving, theta_gt, _ = self.generator.sample(batch)
            theta = agent.theta_start.expand(batch, -1)
            if config.state_sampling > 0 or config.near_gt_sampling > 0 or config.wander_sampling > 0:
                theta, moving = states_along_the_way(agent, self.generator.gen, theta, theta_gt, moving,
                                                     config.state_sampling, config.near_gt_sampling,
                                                     config.wander_sampling, config.wander_steps)
            target = self.targets(theta_gt, theta)
            if config.augment > 0:  # after the states: their moving images are warped from the plain image
                fixed = augment_intensity(fixed, self.generator.gen, config.augment)
                moving = augment_intensity(moving, self.generator.gen, config.augment)
        prediction = self.model(fixed, moving)
        loss = ((prediction - target) ** 2).sum(dim=1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    def log(self, iteration: int, running: list[float], validation: list[ValidationPair] | None,
            progress: Callable[[int, int, dict], None] | None) -> None:
        """A row of the history: mean loss since the last row, held-out accuracies and, now and then, the
        validation Dice; reported to ``progress``."""
        config, network = self.config, self.network
        accuracy = held_out_accuracy(network, self.h_fixed, self.h_moving, self.h_target)
        near_accuracy = held_out_accuracy(network, self.h_fixed, self.h_near_moving, self.h_near_target)
        self.model.train()
        val = float("nan")
        if validation and self.rank == 0 and (iteration % config.validate_every == 0 or iteration == self.last):
            val = validate(self.agent, validation, config)["dice_median"]
            self.model.train()
        self.history.append([iteration, float(np.mean(running)), accuracy, val, near_accuracy])
        if progress and self.rank == 0:
            progress(iteration, config.iterations, {"loss": self.history[-1][1], "accuracy": accuracy,
                                                    "near_gt_accuracy": near_accuracy,
                                                    **({"val_dice": val} if val == val else {})})

    def loop(self, checkpoint: Path | None, validation: list[ValidationPair] | None,
             progress: Callable[[int, int, dict], None] | None, time_limit: float | None) -> None:
        """The iterations from the checkpoint's to the configuration's, or until ``time_limit`` (seconds) passes;
        a history row every 50 and a checkpoint every ``checkpoint_every`` and at the end."""
        config = self.config
        batch = config.batch(self.geometry.dim)
        self.model.train()
        t0 = time.perf_counter()
        running = []
        deadline = None if time_limit is None else time.perf_counter() + time_limit
        if self.start >= config.iterations:  # the bundle of a finished checkpoint (one brought from a GPU machine)
            self.save_loss(checkpoint)
        else:
            here = self.device_text()
            if self.trained_on and not self.trained_on.endswith(here):
                here = f"{self.trained_on}, then {here}"
            self.trained_on = here
        for iteration in range(self.start + 1, config.iterations + 1):
            running.append(self.step(batch))
            log_now = iteration % 50 == 0 or iteration == config.iterations
            if deadline is not None and time.perf_counter() > deadline:
                self.last = iteration
                log_now = True
            if log_now:
                self.log(iteration, running, validation, progress)
                running = []
            if iteration % config.checkpoint_every == 0 or iteration == self.last:
                self.seconds, t0 = self.seconds + time.perf_counter() - t0, time.perf_counter()
                self.save_checkpoint(checkpoint, iteration)
            if iteration == self.last:
                break
        self.seconds += time.perf_counter() - t0

    def device_text(self) -> str:
        return device_record(self.device) + (f" x{self.world}" if self.world > 1 else "")

    def bundle(self) -> ModelBundle:
        """The model bundle of the run (its network on the CPU), with the training record; no validation yet."""
        config, history = self.config, self.history
        return ModelBundle(
            network=self.network.cpu().eval(), sdm=self.sdm, geometry=self.geometry, action_steps=self.action_steps,
            agent_defaults={**model_defaults(), "stop_when_no_action_helps": bool(config.stop_rule)},
            training={"config": dataclasses.asdict(config), "iterations": max(self.last, self.start),
                      "seconds": self.seconds,
                      "device": self.trained_on or self.device_text(),
                      "subjects": self.training_set.names, "data": dict(self.training_set.source),
                      "real_pairs": len(self.training_set.pairs), "final_loss": history[-1][1] if history else None,
                      "held_out_accuracy": history[-1][2] if history else None,
                      "held_out_near_gt_accuracy": history[-1][4] if history and len(history[-1]) > 4 else None,
                      "chance_accuracy": 1.0 / self.net_config.num_actions,
                      **({"initialised_from": self.initialised_from} if self.initialised_from else {})},
            validation={},
        )


def states_along_the_way(agent: Agent, gen: torch.Generator, theta_start: torch.Tensor, theta_gt: torch.Tensor,
                         moving: torch.Tensor, fraction: float, near_gt: float = 0.0, wander: float = 0.0,
                         wander_steps: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training states other than the start: a ``fraction`` of the pairs in a random state between the start
    and the GT (plus about one action step of noise per mode), as the agent meets them after some steps; a
    ``wander`` fraction (drawn independently, taking precedence) off the way, with noise of a random scale up to
    ``wander_steps`` action steps per mode, where an agent that has made wrong moves finds itself; and a
    ``near_gt`` fraction (drawn independently, taking precedence over both) within half an action step of the
    GT in every mode, where no action brings the parameters closer: the state the agent should recognise as the
    answer. The state's moving image is the moving image warped by that state's deformation, and Eq. 1 is
    taken from that state."""
    batch = theta_gt.shape[0]
    device = theta_gt.device
    on_path = (torch.rand(batch, 1, generator=gen, device=device) < fraction).float()
    lam = torch.rand(batch, 1, generator=gen, device=device)
    noise = torch.randn(theta_gt.shape, generator=gen, device=device) * agent.action_steps
    theta = theta_start + on_path * (lam * (theta_gt - theta_start) + noise)
    if wander > 0:  # no draws without it: the other configurations' training is unchanged
        off = torch.rand(batch, 1, generator=gen, device=device) < wander
        scale = torch.rand(batch, 1, generator=gen, device=device) * wander_steps
        lam = torch.rand(batch, 1, generator=gen, device=device)
        away = theta_start + lam * (theta_gt - theta_start) + scale * torch.randn(
            theta_gt.shape, generator=gen, device=device) * agent.action_steps
        theta = torch.where(off, away, theta)
    if near_gt > 0:
        near = torch.rand(batch, 1, generator=gen, device=device) < near_gt
        offset = (torch.rand(theta_gt.shape, generator=gen, device=device) - 0.5) * agent.action_steps
        theta = torch.where(near, theta_gt + offset, theta)
    return theta, warp(moving, agent.displacement(theta))


@torch.no_grad()
def held_out_accuracy(network: DualStreamQNetwork, fixed, moving, target) -> float:
    """Fraction of held-out synthetic pairs whose predicted best action is the true best action, where
    "stop" (every target <= 0, as near the GT) counts as an action: the prediction must then be <= 0 too."""
    network.eval()
    prediction = network(fixed, moving)
    same = prediction.argmax(1) == target.argmax(1)
    stop = target.max(1).values <= 0
    right = torch.where(stop, prediction.max(1).values <= 0, same & (prediction.max(1).values > 0))
    return float(right.float().mean())


def validate(agent: Agent, pairs: list[ValidationPair], config: TrainingConfig) -> dict:
    """Run the agent a short while on real validation pairs; Dice before and after."""
    device = agent.device
    stack = lambda key: torch.as_tensor(np.stack([getattr(p, key) for p in pairs]), device=device)[:, None]  # noqa: E731
    fixed, moving, fl, ml = stack("fixed"), stack("moving"), stack("fixed_label"), stack("moving_label")
    result = agent.run(fixed, moving, AgentSettings(steps=config.validation_steps, seed=0))
    after = dice_batch(warp(ml, result.displacement, mode="nearest"), fl).cpu().numpy()
    before = agent.start_dice(ml, fl).cpu().numpy()
    return {"pairs": [p.name for p in pairs], "steps": config.validation_steps,
            "dice_before_median": float(np.median(before)), "dice_median": float(np.median(after)),
            "dice_mean": float(after.mean()), "dice_before_mean": float(before.mean())}


def validate_bundle(bundle: ModelBundle, pairs: list[ValidationPair], config: TrainingConfig) -> dict:
    """:func:`validate` with the bundle's network after a save/load round trip (on the CPU)."""
    reloaded = bundle_from_payload(bundle.to_payload())
    return validate(reloaded.agent(), pairs, config)


