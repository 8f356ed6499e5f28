"""The agent's MDP (paper, 2.1-2.2) on real data: fuzzy action control, seeds, batching, the incremental
displacement update and stopping on convergence.

Everything runs the real 2-D tiny bundle (``tiny_pipeline``: GT, SDM and a briefly trained compact network on
real PROMISE12 subjects) on real pairs of other subjects (middle slices of ``grid128``, already on one grid and
roughly centred, so preprocessed without the elastix translation to keep the suite light). Where the rule under
test is the agent's and not the network's (fuzzy action control's acceptance frequency, taking the best Q when all
actions are rejected, no rejection without fuzzy control), the real agent and SDM run with a stub network whose
Q-values ignore the images (:class:`_NoisyQ`): many thousands of agent steps cost seconds instead of minutes.
"""

import numpy as np
import pytest
import torch
from AgentRegistrationLib.core.agent import Agent, AgentSettings, fuzzy_acceptance
from AgentRegistrationLib.data.preprocessing import middle_slice, prepare_pair
from AgentRegistrationLib.model.bundle import load_bundle
from scipy.stats import norm

PAIRS = [("case02", "case09"), ("case13", "case17"), ("case22", "case30")]  # (fixed, moving), validation subjects


@pytest.fixture(scope="module")
def tiny_2d_bundle(tiny_pipeline):
    return load_bundle(tiny_pipeline(2)["bundle"])


@pytest.fixture(scope="module")
def agent(tiny_2d_bundle):
    return Agent(tiny_2d_bundle.network, tiny_2d_bundle.sdm, tiny_2d_bundle.geometry.size, tiny_2d_bundle.action_steps, "cpu")


@pytest.fixture(scope="module")
def pairs(tiny_2d_bundle, load_case):
    """``(fixed, moving)``, each ``(3, 1, 100, 100)``: three real 2-D pairs on the model grid."""
    prepared = []
    for fixed_name, moving_name in PAIRS:
        fixed, fixed_label = (middle_slice(im) for im in load_case(fixed_name[4:]))
        moving, moving_label = (middle_slice(im) for im in load_case(moving_name[4:]))
        prepared.append(prepare_pair(fixed, moving, tiny_2d_bundle.geometry, fixed_label, moving_label, prealign=False))
    stack = lambda key: torch.as_tensor(np.stack([getattr(p, key) for p in prepared]))[:, None]  # noqa: E731
    return stack("fixed"), stack("moving")


@pytest.fixture(scope="module")
def default_run(agent, pairs):
    """The three pairs in one batch, 200 steps, the bundle's settings (fuzzy action control, exploration)."""
    return agent.run(*pairs, AgentSettings(steps=200, seed=0))


def _thetas_before(agent, result) -> torch.Tensor:
    """``(T, B, d)``: the parameters each step started from."""
    after = torch.stack(result.trajectory.theta)
    return torch.cat([agent.theta_start.expand(1, after.shape[1], -1), after[:-1]])


def _acceptance(agent, theta_before: torch.Tensor, k: float) -> torch.Tensor:
    flat = theta_before.reshape(-1, theta_before.shape[-1])
    return fuzzy_acceptance(flat, agent.deltas, agent.mu, agent.sigma, k).reshape(*theta_before.shape[:-1], -1)


# -- fuzzy action control ----------------------------------------------------------------------------------------
def test_fuzzy_acceptance_is_one_inside_k_sigma_and_the_gaussian_ratio_outside(agent, tiny_2d_bundle):
    """With the real SDM: the acceptance of a move to f of mode m is 1 when |f - mu| <= k sigma, else
    N(f; mu, sigma) / N(mu + k sigma; mu, sigma) (paper, 2.2)."""
    k, sdm = 1.5, tiny_2d_bundle.sdm
    d = sdm.num_modes
    z = np.linspace(-4.0, 4.0, 81)  # where each move lands, in standard deviations
    for a in range(2 * d):
        m, step = a // 2, float(agent.deltas[a])
        f = sdm.mu[m] + z * sdm.sigma[m]
        theta = np.tile(sdm.mu, (len(z), 1))
        theta[:, m] = f - step
        p = fuzzy_acceptance(torch.tensor(theta, dtype=torch.float32), agent.deltas, agent.mu, agent.sigma, k)[:, a]
        expected = np.minimum(1.0, norm.pdf(f, sdm.mu[m], sdm.sigma[m]) / norm.pdf(sdm.mu[m] + k * sdm.sigma[m], sdm.mu[m],
                                                                                     sdm.sigma[m]))
        assert np.all(p[np.abs(z) <= k - 1e-3].numpy() == 1.0)
        assert np.allclose(p.numpy(), expected, rtol=1e-4, atol=1e-6)
        assert np.all(p[np.abs(z) > k + 1e-3].numpy() < 1.0)


class _NoisyQ(torch.nn.Module):
    """A Q-network stub that ignores the images: per pair and step, ``bias`` plus standard normal noise from its
    own seeded generator. With a bias for the "+" actions the agent walks out to the edge of the plausible space and
    back, so its moves land everywhere from well inside mu +- k sigma to far outside."""

    def __init__(self, num_actions: int, bias: float = 0.0, seed: int = 0):
        super().__init__()
        self.bias = torch.tensor([bias, 0.0] * (num_actions // 2))
        self.generator = torch.Generator().manual_seed(seed)

    def fixed_features(self, fixed):  # the agent's interface of a Q-network (DualStreamQNetwork)
        return fixed

    def q_values(self, fixed_features, moving):
        return self.bias + torch.randn(fixed_features.shape[0], self.bias.numel(), generator=self.generator)


def _stub_agent(tiny_2d_bundle, **stub) -> Agent:
    """The real agent (the bundle's SDM, action steps and image size) driven by :class:`_NoisyQ`."""
    b = tiny_2d_bundle
    return Agent(_NoisyQ(2 * b.sdm.num_modes, **stub), b.sdm, b.geometry.size, b.action_steps, "cpu")


def test_agent_rejects_moves_with_the_fuzzy_acceptance_frequency(tiny_2d_bundle, pairs):
    """Over 20000 draws of the real agent (one real pair, five seeds, 500 steps, 8 actions; Q-values of
    :class:`_NoisyQ`, so that the moves reach every band of acceptance): moves that stay within mu +- k sigma are
    always accepted; outside, the acceptance frequency matches min(1, N(f)/N(h)) within sampling error, per band of
    acceptance probability."""
    agent = _stub_agent(tiny_2d_bundle, bias=0.5)
    fixed, moving = (x[1:2] for x in pairs)
    p_all, rejected_all = [], []
    for seed in range(5):
        result = agent.run(fixed, moving, AgentSettings(steps=500, seed=seed))
        p_all.append(_acceptance(agent, _thetas_before(agent, result), 1.5).flatten())
        rejected_all.append(torch.stack(result.trajectory.rejected).flatten())
    p, rejected = torch.cat(p_all).double(), torch.cat(rejected_all)
    assert p.numel() == 20000
    inside = p == 1.0
    assert inside.sum() > 1000 and not rejected[inside].any()
    bands = [(0.0, 0.05), (0.05, 0.3), (0.3, 0.7), (0.7, 1.0)]
    checked = 0
    for lo, hi in bands:
        band = (p >= lo) & (p < hi)
        n = int(band.sum())
        assert n >= 100, f"only {n} moves with acceptance in [{lo}, {hi})"
        accepted = (~rejected[band]).double()
        # draws are independent given the state they were made in: the sum is a martingale with this variance
        sd = float(torch.sqrt((p[band] * (1 - p[band])).sum())) / n
        assert abs(float(accepted.mean() - p[band].mean())) < 4 * sd + 1e-3, (lo, hi, n)
        checked += n
    assert checked > 5000  # enough moves left the plausible space for the test to mean something


def test_rejected_actions_are_never_chosen_while_an_action_is_accepted(default_run):
    actions = torch.stack(default_run.trajectory.actions)  # (T, B)
    rejected = torch.stack(default_run.trajectory.rejected)  # (T, B, 2d)
    chosen_rejected = rejected.gather(2, actions.clamp(min=0)[..., None])[..., 0]
    some_accepted = ~rejected.all(dim=2)
    assert rejected.any()
    assert not (chosen_rejected & some_accepted).any()


def test_when_every_action_is_rejected_the_best_q_is_taken(tiny_2d_bundle, pairs):
    """Rejection adds a large negative value to the Q-values (paper, 2.2), which keeps their order: when all
    are rejected the network's best action is taken. Here the plausible centre is moved 5 sigma away from the
    start, so every move stays implausible and is (almost always) rejected; the Q-values (:class:`_NoisyQ`) change
    from step to step, so the best action does too."""
    far = _stub_agent(tiny_2d_bundle)
    far.mu = far.mu + 5 * far.sigma
    result = far.run(*pairs, AgentSettings(steps=60, seed=0, fuzzy_k=0.05, exploration=0.0))
    actions = torch.stack(result.trajectory.actions)
    q = torch.stack(result.trajectory.q_values)
    all_rejected = torch.stack(result.trajectory.rejected).all(dim=2)
    assert all_rejected.sum() > 10
    assert len(set(actions[all_rejected].tolist())) > 1
    assert torch.equal(actions[all_rejected], q.argmax(dim=2)[all_rejected])


def test_without_fuzzy_action_control_nothing_is_rejected(tiny_2d_bundle, pairs):
    """Far from the plausible centre, where fuzzy control would reject almost every move: without it nothing is
    rejected and the best Q is always taken."""
    agent = _stub_agent(tiny_2d_bundle, bias=0.5)
    agent.mu = agent.mu + 5 * agent.sigma
    result = agent.run(*pairs, AgentSettings(steps=200, seed=0, fuzzy_action_control=False, exploration=0.0))
    assert not torch.stack(result.trajectory.rejected).any()
    assert torch.equal(torch.stack(result.trajectory.actions), torch.stack(result.trajectory.q_values).argmax(dim=2))


# -- seeds and batching ----------------------------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_trajectory(agent, pairs, default_run):
    again = agent.run(*pairs, AgentSettings(steps=200, seed=0))
    assert torch.equal(torch.stack(again.trajectory.actions), torch.stack(default_run.trajectory.actions))
    assert np.array_equal(again.theta, default_run.theta)
    assert torch.equal(torch.stack(again.trajectory.theta), torch.stack(default_run.trajectory.theta))


def test_another_seed_gives_another_trajectory(agent, pairs, default_run):
    other = agent.run(*pairs, AgentSettings(steps=200, seed=1))
    differs = (torch.stack(other.trajectory.actions) != torch.stack(default_run.trajectory.actions)).any(dim=0)
    assert differs.all()  # every pair explores differently


def test_a_batch_equals_each_pair_alone(agent, pairs, default_run):
    """A pair's result does not depend on the other pairs of its batch (nor on its position or the batch size)."""
    fixed, moving = pairs
    for i in range(fixed.shape[0]):
        alone = agent.run(fixed[i:i + 1], moving[i:i + 1], AgentSettings(steps=200, seed=0))
        assert torch.equal(torch.stack(alone.trajectory.actions)[:, 0], torch.stack(default_run.trajectory.actions)[:, i])
        assert np.allclose(alone.theta[0], default_run.theta[i], atol=1e-4)
        assert torch.allclose(alone.displacement[0], default_run.displacement[i], atol=1e-4)


# -- the displacement and stopping -------------------------------------------------------------------------------
def test_incremental_displacement_equals_the_field_from_all_modes(agent, default_run):
    """After 200 one-mode updates the dense displacement equals the one recomputed from all modes."""
    theta = torch.as_tensor(default_run.theta, dtype=torch.float32)
    assert (theta - agent.theta_start).abs().max() > 10 * agent.action_steps.min()  # the agent did move
    recomputed = agent.displacement(theta)
    assert recomputed.abs().max() > 1.0
    assert torch.allclose(default_run.displacement, recomputed, atol=1e-3)


def test_stop_on_convergence_stops_when_the_agent_oscillates(agent, pairs):
    """The documented rule: a pair stops after step t once no mode moved by more than one step between the
    parameters of step t - W + 1 and step t (window W). Then it stops moving; its path up to there is the
    path of the run without stopping."""
    window, steps = 20, 1000
    result = agent.run(*pairs, AgentSettings(steps=steps, seed=0, stop_on_convergence=True, convergence_window=window))
    stopped = result.steps_taken
    assert np.all(stopped < steps)
    thetas = torch.stack(result.trajectory.theta)  # (T, B, d), T = when the last pair stopped
    step_sizes = agent.action_steps * 1.01
    full = agent.run(*pairs, AgentSettings(steps=int(stopped.max()), seed=0))
    for i, t_stop in enumerate(stopped):
        moved = [(thetas[t - 1, i] - thetas[t - window, i]).abs() for t in range(window, t_stop + 1)]
        assert all((m > step_sizes).any() for m in moved[:-1])  # still moving before
        assert not (moved[-1] > step_sizes).any()  # converged at t_stop
        assert torch.all(torch.stack(result.trajectory.actions)[t_stop:, i] == -1)
        assert torch.equal(thetas[t_stop - 1:, i], thetas[t_stop - 1, i].expand(len(thetas) - t_stop + 1, -1))
        assert torch.equal(torch.stack(full.trajectory.theta)[:t_stop, i], thetas[:t_stop, i])


class _ShiftedQ(torch.nn.Module):
    """The real network's Q-values shifted down by ``shift``: a network that finds fewer and fewer moves worth
    making (the stop rule is about the Q-values, not about what the network learned)."""

    def __init__(self, network, shift: float):
        super().__init__()
        self.network, self.shift = network, shift

    def fixed_features(self, fixed):  # the agent's interface of a Q-network (DualStreamQNetwork)
        return self.network.fixed_features(fixed)

    def q_values(self, fixed_features, moving):
        return self.network.q_values(fixed_features, moving) - self.shift


def test_the_stop_rule_stops_a_pair_once_no_allowed_action_is_predicted_to_help(agent, tiny_2d_bundle, pairs):
    with torch.no_grad():
        q = agent.network(*pairs)
    b = tiny_2d_bundle
    shifted = Agent(_ShiftedQ(b.network, float(q.max(1).values.median())), b.sdm, b.geometry.size, b.action_steps, "cpu")
    settings = AgentSettings(steps=200, seed=0, stop_when_no_action_helps=True, exploration=0.0)
    result = shifted.run(*pairs, settings)
    actions, qs = torch.stack(result.trajectory.actions), torch.stack(result.trajectory.q_values)
    rejected = torch.stack(result.trajectory.rejected)
    allowed_best = qs.masked_fill(rejected & ~rejected.all(2, keepdim=True), -1e9).max(2).values
    for i, taken in enumerate(result.steps_taken):
        assert (allowed_best[:taken, i] > 0).all()  # every step taken was predicted to help
        if taken < len(actions):
            assert allowed_best[taken, i] <= 0 and (actions[taken:, i] == -1).all()  # then it stopped for good
    assert result.steps_taken.min() < 200  # with Q-values lowered, some pair stops before the cap
    never = shifted.run(*pairs, AgentSettings(steps=5, seed=0, exploration=0.0))
    assert (never.steps_taken == 5).all()  # without the rule the same agent runs every step
