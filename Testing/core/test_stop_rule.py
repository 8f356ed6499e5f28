"""The stop rule and its margin: a pair stops once no allowed action's Q-value is above the margin; one run without
the rule measures every margin (``stop_steps``), which is how a model's default margin is chosen on training pairs.

Runs the real 2-D tiny bundle on real pairs of validation subjects (middle slices of ``grid128``).
"""

import numpy as np
import pytest
import torch
from AgentRegistrationLib.core.agent import Agent, AgentSettings, choose_stop_margin, dice_by_margin, stop_steps
from AgentRegistrationLib.core.metrics import dice_batch
from AgentRegistrationLib.core.warp import warp
from AgentRegistrationLib.data.preprocessing import middle_slice, prepare_pair
from AgentRegistrationLib.model.bundle import load_bundle

PAIRS = [("02", "09"), ("13", "17"), ("22", "30"), ("46", "49")]  # (fixed, moving)
STEPS = 30


@pytest.fixture(scope="module")
def tiny_2d_bundle(tiny_pipeline):
    return load_bundle(tiny_pipeline(2)["bundle"])


@pytest.fixture(scope="module")
def prepared(tiny_2d_bundle, load_case):
    """The four pairs on the model grid: ``(fixed, moving, fixed_label, moving_label)``, each ``(4, 1, *spatial)``."""
    prepared = []
    for fixed_name, moving_name in PAIRS:
        fixed, fixed_label = (middle_slice(im) for im in load_case(fixed_name))
        moving, moving_label = (middle_slice(im) for im in load_case(moving_name))
        prepared.append(prepare_pair(fixed, moving, tiny_2d_bundle.geometry, fixed_label, moving_label, prealign=False))
    return [torch.as_tensor(np.stack([getattr(p, key) for p in prepared]))[:, None]
            for key in ("fixed", "moving", "fixed_label", "moving_label")]


@pytest.fixture(scope="module")
def pairs(prepared):
    """``(fixed, moving)``."""
    return prepared[:2]


def _spread_margin(best_q: np.ndarray) -> float:
    """A margin chosen from a run itself so that the pairs stop at different steps: among every value the run
    reached, the one whose stop steps spread most (a run whose pairs' Q-values differ always has one)."""
    margin = max((float(m) for m in np.unique(best_q.clip(min=0.0))),
                 key=lambda m: np.ptp(stop_steps(best_q, m, STEPS)))
    assert np.ptp(stop_steps(best_q, margin, STEPS)) > 0, "the four pairs' Q-values are identical"
    return margin


def test_a_run_with_a_margin_is_the_run_without_the_rule_cut_where_the_rule_stops(tiny_2d_bundle, pairs):
    agent = tiny_2d_bundle.agent("cpu")
    free = agent.run(*pairs, AgentSettings(steps=STEPS, seed=3))
    best_q = free.trajectory.best_allowed_q().numpy()
    thetas = np.concatenate([free.theta_start[None, None].repeat(len(PAIRS), 1),
                             torch.stack(free.trajectory.theta).double().numpy()])  # (1 + steps, pairs, d)
    stopped_early = 0
    for margin in sorted({0.0, *np.quantile(best_q, [0.5, 0.9, 0.99]).clip(min=0.0)}):
        expected = stop_steps(best_q, float(margin), STEPS)
        ruled = agent.run(*pairs, AgentSettings(steps=STEPS, seed=3, stop_when_no_action_helps=True,
                                                stop_margin=float(margin), similarity_guard=False))  # the MDP's end
        np.testing.assert_array_equal(ruled.steps_taken, expected)
        np.testing.assert_allclose(ruled.theta, thetas[expected, np.arange(len(PAIRS))], atol=1e-5)
        stopped_early += int((expected < STEPS).sum())
    assert stopped_early > 0  # the margins above were drawn from the run itself, so some pair stops


def test_stop_steps_is_the_first_step_at_or_below_the_margin_or_the_cap():
    best_q = np.array([[5.0, 0.5, 9.0], [3.0, 7.0, 9.0], [1.0, 0.1, 9.0]])  # (steps, pairs)
    np.testing.assert_array_equal(stop_steps(best_q, 0.5, 3), [3, 0, 3])  # pair 1 stops before any step
    np.testing.assert_array_equal(stop_steps(best_q, 3.0, 3), [1, 0, 3])
    np.testing.assert_array_equal(stop_steps(best_q, 3.0, 1), [1, 0, 1])  # the cap counts too


def test_the_chosen_margin_has_the_best_mean_dice_and_ties_go_to_the_smaller():
    steps, pairs = 4, 2
    best_q = np.array([[9.0, 9.0], [3.0, 3.0], [1.5, 1.5], [0.1, 0.1]])
    dice = np.array([[0.5, 0.5], [0.6, 0.6], [0.9, 0.8], [0.7, 0.7], [0.6, 0.6]])  # (1 + steps, pairs)
    assert dice_by_margin(best_q, dice, steps)[2.0].tolist() == [0.9, 0.8]  # stops after 2 steps (1.5 <= 2)
    assert dice_by_margin(best_q, dice, steps)[4.0].tolist() == [0.6, 0.6]  # after 1 (3.0 <= 4)
    assert choose_stop_margin(best_q, dice, steps) == 2.0
    flat = np.full((1 + steps, pairs), 0.7)
    assert choose_stop_margin(best_q, flat, steps) == 0.0


def test_a_negative_margin_is_refused():
    with pytest.raises(ValueError, match="stop margin"):
        AgentSettings(stop_margin=-1.0)


def test_a_run_every_pair_stopped_early_still_reports_its_end(tiny_2d_bundle, pairs):
    calls = []
    result = tiny_2d_bundle.agent("cpu").run(*pairs, AgentSettings(steps=STEPS, stop_when_no_action_helps=True,
                                                            stop_margin=1e9), callback=lambda *a: calls.append(a))
    assert result.steps_taken.max() == 0  # no Q-value is above the margin: every pair stops before its first step
    assert calls == [(1, STEPS), (STEPS, STEPS)]  # the step that found it, then the end of the run


class _CountingNetwork(torch.nn.Module):
    """The real network, recording how many pairs each call was given."""

    def __init__(self, network):
        super().__init__()
        self.network, self.sizes = network, []

    def fixed_features(self, fixed):  # the agent's interface of a Q-network (DualStreamQNetwork)
        return self.network.fixed_features(fixed)

    def q_values(self, fixed_features, moving):
        self.sizes.append(fixed_features.shape[0])
        return self.network.q_values(fixed_features, moving)


def test_stopped_pairs_leave_the_batch_and_each_pair_ends_as_it_would_alone(tiny_2d_bundle, pairs):
    free = tiny_2d_bundle.agent("cpu").run(*pairs, AgentSettings(steps=STEPS, seed=3))
    margin = _spread_margin(free.trajectory.best_allowed_q().numpy())
    settings = AgentSettings(steps=STEPS, seed=3, stop_when_no_action_helps=True, stop_margin=margin)
    counting = _CountingNetwork(tiny_2d_bundle.network)
    agent = Agent(counting, tiny_2d_bundle.sdm, tiny_2d_bundle.geometry.size, tiny_2d_bundle.action_steps, "cpu")
    batch = agent.run(*pairs, settings)
    assert batch.steps_taken.min() < batch.steps_taken.max()  # pairs stop at different steps
    # the network sees only the pairs still moving: one fewer row per call for every pair that has stopped
    assert counting.sizes == [int((batch.steps_taken >= step).sum()) for step in range(len(counting.sizes))]
    for i in range(len(PAIRS)):
        alone = agent.run(pairs[0][i:i + 1], pairs[1][i:i + 1], settings)
        assert alone.steps_taken[0] == batch.steps_taken[i]
        np.testing.assert_allclose(alone.theta[0], batch.theta[i], atol=1e-5)
        assert torch.allclose(alone.displacement[0], batch.displacement[i], atol=1e-4)


def test_the_dice_of_each_step_is_that_of_its_parameters_and_a_stopped_pair_keeps_its_last(tiny_2d_bundle, prepared):
    """The Dice after each step (computed by a second thread beside the steps) is the Dice of the moving label
    warped by that step's parameters; once a pair has stopped, its Dice stays."""
    fixed, moving, fixed_label, moving_label = prepared
    agent = tiny_2d_bundle.agent("cpu")
    margin = _spread_margin(agent.run(fixed, moving, AgentSettings(steps=STEPS, seed=3)).trajectory.best_allowed_q().numpy())
    run = agent.run(fixed, moving, AgentSettings(steps=STEPS, seed=3, stop_when_no_action_helps=True, stop_margin=margin),
                    moving_label, fixed_label)
    dice, thetas = torch.stack(run.trajectory.dice), torch.stack(run.trajectory.theta)  # (T, pairs), (T, pairs, d)
    assert dice.shape == thetas.shape[:2] and run.steps_taken.min() < len(dice)  # a pair stopped before the end
    for step in range(len(dice)):  # the parameters' field, from all modes (the run's is updated one mode at a time)
        expected = dice_batch(warp(moving_label, agent.displacement(thetas[step]), mode="nearest"), fixed_label)
        assert torch.allclose(dice[step], expected, atol=5e-3)
    longest = int(np.argmax(run.steps_taken))
    assert dice[:, longest].max() > dice[:, longest].min()  # the pair that walked furthest changed its Dice
    for i, taken in enumerate(run.steps_taken):
        assert (dice[max(int(taken) - 1, 0):, i] == dice[max(int(taken) - 1, 0), i]).all()
