"""The agent's Markov decision process at test time (paper, 2.1 and 2.2).

State: the fixed image and the moving image warped by the current parameters ``theta``.
Actions: ``2d``; action ``2i`` adds the step of mode ``i``, action ``2i+1`` subtracts it.
The network's Q-values pick the action; with a small fixed probability a random accepted
action is taken instead (the paper's stochastic exploration). Fuzzy action control
stochastically rejects moves that leave the plausible part of the SDM: a move of mode ``m`` to
``f`` is accepted with probability ``min(1, N(f; mu, sigma) / N(h; mu, sigma))``, ``h = mu + k
sigma``; a rejected action gets a large negative Q-value, so the next best is taken.

With ``stop_when_no_action_helps`` a pair stops as soon as no allowed action has a Q-value above
``stop_margin`` (0: no move is predicted to bring it closer to the answer; a model trained with targets
in units of each mode's step stores a margin chosen on training pairs, since the predictions carry an
error); the number of steps is then a cap.

Speed: the loop stays on one device; one action changes one mode, so the dense displacement and
its sampling grid are updated by adding one precomputed mode field (never recomputed from all
modes); the fixed image's stream of the network runs once per run, not at every step; the Dice
after each step is computed by a second thread (:class:`StepDice`); many pairs run as one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from AgentRegistrationLib.core.metrics import dice_batch
from AgentRegistrationLib.core.network import DualStreamQNetwork
from AgentRegistrationLib.core.sdm import StatisticalDeformationModel
from AgentRegistrationLib.core.warp import grid_scale, sample, sampling_grid, warp

REJECTED = -1.0e9


@dataclass
class AgentSettings:
    steps: int = 200
    fuzzy_action_control: bool = True
    fuzzy_k: float = 1.5
    exploration: float = 0.05  # probability of a random (accepted) action instead of the best
    stop_on_convergence: bool = False
    convergence_window: int = 20
    stop_when_no_action_helps: bool = False  # stop a pair once its best allowed Q-value is <= stop_margin
    stop_margin: float = 0.0  # with the stop rule: the predicted gain (the Q-value's units) that is not worth a step
    seed: int = 0
    similarity_guard: bool = True  # first, do no harm: keep the start when the end's crops are no more alike

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, not {self.steps}")
        if self.fuzzy_k <= 0:
            raise ValueError(f"fuzzy action control k must be > 0, not {self.fuzzy_k}")
        if not 0.0 <= self.exploration < 1.0:
            raise ValueError(f"exploration probability must be in [0, 1), not {self.exploration}")
        if self.stop_margin < 0:
            raise ValueError(f"stop margin must be >= 0, not {self.stop_margin}")


def model_defaults() -> dict:
    """The agent settings a new model stores as its own defaults (``ModelBundle.agent_defaults``): fuzzy action
    control's k, the exploration probability and the number of steps, as :class:`AgentSettings` has them."""
    settings = AgentSettings()
    return {"fuzzy_k": settings.fuzzy_k, "exploration": settings.exploration, "steps": settings.steps}


@dataclass
class Trajectory:
    """Per step and pair: the action taken, all Q-values, which actions fuzzy control rejected,
    the parameters after the step and, with labels, the Dice after the step."""

    actions: list[torch.Tensor] = field(default_factory=list)  # (B,) long; -1 once a pair has stopped
    q_values: list[torch.Tensor] = field(default_factory=list)  # (B, 2d)
    rejected: list[torch.Tensor] = field(default_factory=list)  # (B, 2d) bool
    theta: list[torch.Tensor] = field(default_factory=list)  # (B, d), after the step
    dice: list[torch.Tensor] = field(default_factory=list)  # (B,), after the step

    def best_allowed_q(self) -> torch.Tensor:
        """``(steps, B)``: the best Q-value among the actions fuzzy control allowed, before each step's action (what
        the stop rule compares with its margin)."""
        q, rejected = torch.stack(self.q_values), torch.stack(self.rejected)
        allowed = ~rejected | rejected.all(dim=-1, keepdim=True)
        return q.masked_fill(~allowed, REJECTED).max(dim=-1).values

    def stacked(self) -> dict[str, np.ndarray]:
        out = {k: torch.stack(getattr(self, k)).cpu().numpy() for k in ("actions", "q_values", "rejected", "theta")
               if getattr(self, k)}
        if self.dice:
            out["dice"] = torch.stack(self.dice).cpu().numpy()
        return out


@dataclass
class AgentResult:
    theta: np.ndarray  # (B, d)
    theta_start: np.ndarray  # (d,)
    displacement: torch.Tensor  # (B, dim, *spatial), model voxels
    trajectory: Trajectory
    steps_taken: np.ndarray  # (B,)
    similarity_start: np.ndarray | None = None  # (B,) organ_region_correlation at the start
    similarity_end: np.ndarray | None = None  # (B,) of the result (the start where it was kept)
    start_kept: np.ndarray | None = None  # (B,) bool: the similarity guard kept the start


ORGAN_REGION = 0.6
"""The organ region of a crop for :func:`organ_region_correlation`: the middle 60 % of the crop along each axis (a
crop spans 10 (7 in z) standard deviations of the organ, which spans about 4.5: the organ and its rim)."""


def organ_region_correlation(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """``(B,)`` Pearson correlation of ``fixed`` and ``warped`` ``(B, 1, *spatial)`` over the organ region
    (:data:`ORGAN_REGION`): how alike the two crops are where the organ is."""
    region = tuple(slice(int(n * (1 - ORGAN_REGION) / 2), int(n * (1 + ORGAN_REGION) / 2) + 1)
                   for n in fixed.shape[2:])
    a = fixed[(slice(None), slice(None), *region)].flatten(1).double()
    b = warped[(slice(None), slice(None), *region)].flatten(1).double()
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    norm = (a.square().sum(dim=1) * b.square().sum(dim=1)).sqrt()
    return torch.where(norm > 0, (a * b).sum(dim=1) / norm.clamp(min=1e-12), torch.zeros_like(norm))


STOP_MARGINS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The stop margins a model's default is chosen from (on training pairs; :func:`stop_steps`)."""


def stop_steps(best_q: np.ndarray, margin: float, cap: int) -> np.ndarray:
    """Per pair, the number of steps after which the stop rule with ``margin`` stops it (at most ``cap``), from the
    ``(steps, B)`` best allowed Q-values of a run without the stop rule: a run with the rule is the same run up to
    that step (the random draws are per step, shared by the pairs), so one run measures every margin."""
    below = np.asarray(best_q)[:cap] <= margin
    return np.where(below.any(axis=0), below.argmax(axis=0), min(cap, len(below)))


def dice_by_margin(best_q: np.ndarray, dice: np.ndarray, cap: int) -> dict[float, np.ndarray]:
    """Per margin of :data:`STOP_MARGINS`, each pair's Dice where the stop rule stops it: ``dice`` is
    ``(steps + 1, B)`` (row 0: the start) of the same run as ``best_q``."""
    columns = np.arange(dice.shape[1])
    return {margin: dice[stop_steps(best_q, margin, cap), columns] for margin in STOP_MARGINS}


def choose_stop_margin(best_q: np.ndarray, dice: np.ndarray, cap: int) -> float:
    """The margin of :data:`STOP_MARGINS` with the best mean Dice (ties: the smaller margin)."""
    means = {margin: float(values.mean()) for margin, values in dice_by_margin(best_q, dice, cap).items()}
    return max(means, key=lambda margin: (round(means[margin], 6), -margin))


def fuzzy_acceptance(theta: torch.Tensor, deltas: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                     k: float) -> torch.Tensor:
    """Acceptance probability of every action: ``(B, 2d)`` from ``theta`` ``(B, d)`` and the
    signed action increments ``deltas`` ``(2d,)`` (action ``a`` moves mode ``a // 2``)."""
    mode = torch.arange(deltas.numel(), device=theta.device) // 2
    f = theta[:, mode] + deltas
    z2 = ((f - mu[mode]) / sigma[mode]) ** 2
    return torch.exp(-(z2 - k * k) / 2.0).clamp(max=1.0)


def signed_steps(action_steps: torch.Tensor) -> torch.Tensor:
    """``(2d,)``: +step for action 2i, -step for action 2i+1."""
    return torch.stack([action_steps, -action_steps], dim=1).reshape(-1)


class StepDice:
    """The Dice after each step, computed beside the steps: a second thread warps the moving labels by each step's
    displacement while the loop runs the network. torch releases the interpreter's lock inside its operators, so
    on a CPU the two use two cores and the Dice costs the steps almost nothing (it was a third of each step); the
    values are those computed in the loop. A pair that has stopped keeps its last Dice."""

    PENDING = 8
    """Steps the thread may lag behind before :meth:`add` waits (each holds a copy of the displacement)."""

    def __init__(self, moving_label: torch.Tensor, fixed_label: torch.Tensor):
        self.moving_label, self.fixed_label = moving_label, fixed_label
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-dice")
        self._futures: list[Future] = []
        self._last: torch.Tensor | None = None

    def add(self, grid: torch.Tensor, active: torch.Tensor) -> None:
        """Queue the Dice of the displacement whose :func:`.warp.sampling_grid` is ``grid``; ``active``: the pairs
        that moved."""
        if len(self._futures) > self.PENDING:
            self._futures[-self.PENDING - 1].result()
        self._futures.append(self._pool.submit(self._dice, grid.clone(), active.clone()))

    @torch.no_grad()
    def _dice(self, grid: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        if self._last is None or bool(active.all()):
            dice = dice_batch(sample(self.moving_label, grid, mode="nearest"), self.fixed_label)
        else:
            rows = active.nonzero()[:, 0]
            dice = self._last.clone()
            dice[rows] = dice_batch(sample(self.moving_label[rows], grid[rows], mode="nearest"), self.fixed_label[rows])
        self._last = dice
        return dice

    def results(self) -> list[torch.Tensor]:
        """``(B,)`` per step, in order (waits for the thread)."""
        return [future.result() for future in self._futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Agent:
    """Runs the MDP for a batch of pairs on one device."""

    def __init__(self, network: DualStreamQNetwork, sdm: StatisticalDeformationModel, image_size: tuple[int, ...],
                 action_steps: np.ndarray, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.sdm = sdm
        bases = sdm.grid.image_bases(image_size, device=self.device, dtype=torch.float32)
        self.mean_field, self.mode_fields = sdm.fields(bases)  # (dim, *sp), (d, dim, *sp)
        # each mode's change of the sampling grid (warp.sampling_grid), which the steps update as they update the field
        spatial = tuple(self.mode_fields.shape[2:])
        scale = grid_scale(spatial, self.device, torch.float32).view(1, len(spatial), *([1] * len(spatial)))
        self.mode_grids = (self.mode_fields * scale).movedim(1, -1).contiguous()  # (d, *sp, dim)
        self.action_steps = torch.as_tensor(action_steps, dtype=torch.float32, device=self.device)
        self.deltas = signed_steps(self.action_steps)
        self.mu = torch.as_tensor(sdm.mu, dtype=torch.float32, device=self.device)
        self.sigma = torch.as_tensor(sdm.sigma, dtype=torch.float32, device=self.device)
        self.theta_start = torch.as_tensor(sdm.theta_identity, dtype=torch.float32, device=self.device)

    def displacement(self, theta: torch.Tensor) -> torch.Tensor:
        """Dense displacement ``(B, dim, *spatial)`` of parameters ``(B, d)`` (from all modes)."""
        return self.mean_field + torch.einsum("bm,m...->b...", theta, self.mode_fields)

    @torch.no_grad()
    def start_dice(self, moving_label: torch.Tensor, fixed_label: torch.Tensor) -> torch.Tensor:
        """``(B,)`` Dice of the moving labels warped by the start parameters (before any step), with the fixed ones."""
        start = self.displacement(self.theta_start[None].expand(moving_label.shape[0], -1))
        return dice_batch(warp(moving_label.to(self.device), start, mode="nearest"), fixed_label.to(self.device))

    def q_values(self, fixed_features: torch.Tensor, moving: torch.Tensor, grid: torch.Tensor,
                 active: torch.Tensor) -> torch.Tensor:
        """``(B, 2d)`` Q-values of the current states (``moving`` warped by the sampling ``grid`` of the current
        displacement), from the fixed stream's features (computed once per run); once some pairs have stopped, the
        network runs on the others only (a stopped pair's row is 0: it takes no more steps, and its trajectory ends
        where it stopped)."""
        if bool(active.all()):
            return self.network.q_values(fixed_features, sample(moving, grid))
        rows = active.nonzero()[:, 0]
        q = torch.zeros(fixed_features.shape[0], self.deltas.numel(), device=self.device)
        q[rows] = self.network.q_values(fixed_features[rows], sample(moving[rows], grid[rows]))
        return q

    @torch.no_grad()
    def run(self, fixed: torch.Tensor, moving: torch.Tensor, settings: AgentSettings,
            moving_label: torch.Tensor | None = None, fixed_label: torch.Tensor | None = None,
            callback: Callable[[int, int], bool | None] | None = None) -> AgentResult:
        """Register ``moving`` to ``fixed`` (``(B, 1, *spatial)`` on the model grid).

        ``callback(step, total)`` is called after every step, and once with ``(total, total)`` when every pair
        stopped before ``total`` (so that a progress display reaches its end); returning ``False`` cancels
        (raises ``InterruptedError``).
        """
        self.network.eval()  # batch statistics of a network in training mode would change every Q-value
        fixed = fixed.to(self.device, torch.float32)
        moving = moving.to(self.device, torch.float32)
        batch = fixed.shape[0]
        theta = self.theta_start.expand(batch, -1).clone()
        u = self.displacement(theta)
        active = torch.ones(batch, dtype=torch.bool, device=self.device)
        steps_taken = torch.zeros(batch, dtype=torch.long, device=self.device)
        labels = moving_label is not None and fixed_label is not None
        if labels:
            moving_label = moving_label.to(self.device)
            fixed_label = fixed_label.to(self.device)
        trajectory = Trajectory()
        step_dice = StepDice(moving_label, fixed_label) if labels else None
        try:
            self._walk(fixed, moving, settings, theta, u, active, steps_taken, trajectory, step_dice, callback)
            if step_dice is not None:
                trajectory.dice = step_dice.results()
        finally:
            if step_dice is not None:
                step_dice.close()
        result = AgentResult(theta.cpu().double().numpy(), self.theta_start.cpu().double().numpy(), u, trajectory,
                             steps_taken.cpu().numpy())
        if settings.similarity_guard:
            self._keep_start_unless_more_alike(fixed, moving, result)
        return result

    def _walk(self, fixed: torch.Tensor, moving: torch.Tensor, settings: AgentSettings, theta: torch.Tensor,
              u: torch.Tensor, active: torch.Tensor, steps_taken: torch.Tensor, trajectory: Trajectory,
              step_dice: StepDice | None, callback: Callable[[int, int], bool | None] | None) -> None:
        """The steps of :meth:`run`, updating ``theta``, ``u``, ``active``, ``steps_taken`` and ``trajectory`` in
        place."""
        batch, n = fixed.shape[0], self.deltas.numel()
        # One random stream seeded by settings.seed, drawn on the CPU and shared by every pair of the batch: a pair's
        # draws do not depend on the batch (size or position) nor on the device, so a batch equals each pair alone.
        # Per step: 2d uniforms for fuzzy action control, 1 for exploration, 2d for the random action.
        draws = torch.rand(settings.steps, 2 * n + 1, generator=torch.Generator().manual_seed(settings.seed))
        draws = draws.to(self.device)
        fixed_features = self.network.fixed_features(fixed)  # the fixed image never changes: its stream runs once
        grid = sampling_grid(u).contiguous()  # updated with u, one mode at a time: never rebuilt from u
        rows = torch.arange(batch, device=self.device)
        for step in range(settings.steps):
            q = self.q_values(fixed_features, moving, grid, active)
            uniform = draws[step].expand(batch, -1)
            if settings.fuzzy_action_control:
                p = fuzzy_acceptance(theta, self.deltas, self.mu, self.sigma, settings.fuzzy_k)
                rejected = uniform[:, :n] >= p
            else:
                rejected = torch.zeros_like(q, dtype=torch.bool)
            # a large negative value added to every rejected Q keeps their order: all rejected -> the best Q
            allowed = ~rejected | rejected.all(dim=1, keepdim=True)
            best_q, action = q.masked_fill(~allowed, REJECTED).max(dim=1)
            if settings.stop_when_no_action_helps:
                active &= best_q > settings.stop_margin  # no move is predicted to help enough: the pair is done
            if settings.exploration > 0:
                explore = uniform[:, n] < settings.exploration
                noise = uniform[:, n + 1:].masked_fill(~allowed, -1.0)
                action = torch.where(explore, noise.argmax(dim=1), action)
            delta = self.deltas[action] * active
            mode = action // 2
            theta[rows, mode] += delta
            # index_select, not mode_fields[mode]: the same copy, but indexing was many times slower on busy cores
            u += delta.view(-1, *([1] * (u.dim() - 1))) * self.mode_fields.index_select(0, mode)
            grid += delta.view(-1, *([1] * (grid.dim() - 1))) * self.mode_grids.index_select(0, mode)
            steps_taken += active.long()
            trajectory.actions.append(torch.where(active, action, torch.full_like(action, -1)))
            trajectory.q_values.append(q)
            trajectory.rejected.append(rejected)
            trajectory.theta.append(theta.clone())
            if step_dice is not None:
                step_dice.add(grid, active)
            if settings.stop_on_convergence and step + 1 >= settings.convergence_window:
                past = trajectory.theta[-settings.convergence_window]
                # converged: no mode moved by more than one step over the window (the agent oscillates)
                active &= ((theta - past).abs() > self.action_steps * 1.01).any(dim=1)
            if callback is not None and callback(step + 1, settings.steps) is False:
                raise InterruptedError("registration cancelled")
            if not active.any():
                if callback is not None and step + 1 < settings.steps:
                    callback(settings.steps, settings.steps)  # every pair stopped: the run is done, say so once
                break

    def _keep_start_unless_more_alike(self, fixed: torch.Tensor, moving: torch.Tensor, result: AgentResult) -> None:
        """First, do no harm: where the agent's end makes the crops no more alike over the organ region than its
        start (the same image: alike already), the result is the start. The trajectory stays as the agent walked."""
        start = self.displacement(self.theta_start[None].expand(fixed.shape[0], -1))
        before = organ_region_correlation(fixed, warp(moving, start))
        after = organ_region_correlation(fixed, warp(moving, result.displacement))
        kept = after <= before
        result.displacement = torch.where(kept.view(-1, *([1] * (start.dim() - 1))), start, result.displacement)
        kept_np = kept.cpu().numpy()
        result.theta = np.where(kept_np[:, None], result.theta_start[None], result.theta)
        result.similarity_start = before.cpu().numpy()
        result.similarity_end = torch.where(kept, before, after).cpu().numpy()
        result.start_kept = kept_np
