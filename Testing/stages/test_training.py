"""Training (paper, 2.1 and 2.3): Eq. 1 targets, synthetic pairs, the Q-network, the model bundle,
checkpoints, DDP and the training configuration.

Real data: the tiny pipeline of conftest (4 PROMISE12 subjects, 12 constrained GT pairs, a 4-mode
SDM). Run with ``pytest -s`` to see the measured figures; each assertion message carries them too.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from AgentRegistrationLib.cli import parser
from AgentRegistrationLib.contract import messages, training_folder, worker_commands
from AgentRegistrationLib.contract.training_config import TrainingConfig, config_by_name
from AgentRegistrationLib.core.agent import Agent
from AgentRegistrationLib.core.bspline import ControlGrid
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.metrics import dice_batch
from AgentRegistrationLib.core.network import DualStreamQNetwork, NetworkConfig
from AgentRegistrationLib.core.sdm import StatisticalDeformationModel
from AgentRegistrationLib.core.synthetic import SyntheticPairGenerator, q_targets
from AgentRegistrationLib.core.warp import compose, warp
from AgentRegistrationLib.model.bundle import BundleError, ModelBundle, load_bundle
from AgentRegistrationLib.model.devices import resolve_device
from AgentRegistrationLib.stages.training import action_steps_for, held_out_accuracy, train
from AgentRegistrationLib.stages.training_finish import choose_steps
from AgentRegistrationLib.stages.training_set import TrainingSet, ValidationPair, validation_pairs_from_split

ENGINE_DIR = Path(__file__).resolve().parents[2] / "AgentRegistration"


@dataclasses.dataclass
class Tiny:
    gt: Path
    sdm: StatisticalDeformationModel
    geometry: ModelGeometry
    training_set: TrainingSet
    bundle: Path


@pytest.fixture(scope="module")
def tiny(tiny_pipeline) -> Tiny:
    p = tiny_pipeline(2)
    training_set = TrainingSet.from_groundtruth(p["gt"])
    return Tiny(p["gt"], StatisticalDeformationModel.load(p["sdm"]), training_set.geometry, training_set, p["bundle"])


def _agent(tiny: Tiny) -> Agent:
    net = DualStreamQNetwork(NetworkConfig("compact", 2, tuple(tiny.geometry.size), 2 * tiny.sdm.num_modes))
    return Agent(net, tiny.sdm, tiny.geometry.size, action_steps_for(tiny.sdm, config_by_name("compact")))


def _generator(tiny: Tiny, agent: Agent, seed: int, **kwargs) -> SyntheticPairGenerator:
    ts = tiny.training_set
    return SyntheticPairGenerator(torch.as_tensor(ts.images)[:, None], torch.as_tensor(ts.labels)[:, None], ts.pairs,
                                  tiny.sdm.project(ts.coefficients), tiny.sdm, agent.mode_fields, agent.theta_start,
                                  generator=torch.Generator().manual_seed(seed), **kwargs)


def _config(**changes) -> TrainingConfig:
    base = {"batch_size": 8, "iterations": 10, "checkpoint_every": 10, "validate_every": 100_000}
    return config_by_name("compact").with_overrides([f"{k}={v}" for k, v in {**base, **changes}.items()])


# ----------------------------------------------------------------------------------------- Eq. 1
def test_q_targets_are_eq1_by_brute_force():
    gen = torch.Generator().manual_seed(0)
    batch, d = 7, 5
    theta_gt, theta = torch.randn(batch, d, generator=gen) * 3, torch.randn(batch, d, generator=gen) * 3
    steps = torch.rand(d, generator=gen) + 0.1
    deltas = torch.stack([steps, -steps], 1).reshape(-1)  # action 2i: +step_i, 2i+1: -step_i
    expected = torch.empty(batch, 2 * d)
    for a in range(2 * d):
        delta_a = torch.zeros(d)
        delta_a[a // 2] = deltas[a]
        expected[:, a] = ((theta_gt - theta) ** 2).sum(1) - ((theta_gt - theta - delta_a) ** 2).sum(1)
    torch.testing.assert_close(q_targets(theta_gt, theta, deltas), expected, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------- synthetic pairs
def test_negated_inverse_dice_error_on_real_labels(tiny):
    """Paper 2.3: the inverse of a synthetic deformation is approximated by its negated parameters (<2 % Dice
    there). Real labels warped by a generator draw u, then by -u (one resampling of the composed map), against
    the label. Bound: the approximation must stay well under the change the deformation itself makes (a
    quarter of the Dice loss of warping by u alone), so that the targets still carry the signal."""
    agent = _agent(tiny)
    gen = _generator(tiny, agent, seed=1)
    n = 200
    labels = torch.as_tensor(tiny.training_set.labels)[:, None].float()[torch.arange(n) % len(tiny.training_set.names)]
    u = gen.field(gen.draw(n))
    round_trip = 1 - dice_batch(warp(labels, compose(-u, u)) > 0.5, labels > 0.5).numpy()
    deformed = 1 - dice_batch(warp(labels, u) > 0.5, labels > 0.5).numpy()
    figure = (f"negated-inverse Dice loss (u then -u) on {n} draws: mean {100 * round_trip.mean():.2f} %, median "
              f"{100 * np.median(round_trip):.2f} %, 90th pct {100 * np.percentile(round_trip, 90):.2f} % "
              f"(paper: < 2 %); Dice loss of u alone: mean {100 * deformed.mean():.1f} %")
    print("\n" + figure)
    assert round_trip.mean() < 0.25 * deformed.mean(), figure
    assert np.median(round_trip) < 0.05, figure


def test_composed_inter_subject_gt_against_sequential_warps(tiny):
    """Inter-subject GT composed in parameter space (theta_mn + theta_c - theta_b) against the sequential
    warps it stands for (real GT m -> n, then synthetic c), both applied to the real moving label from
    which the synthetic moving label was made; Dice to the synthetic fixed label."""
    agent = _agent(tiny)
    gen = _generator(tiny, agent, seed=2)
    ts = tiny.training_set
    n = 200
    pick = torch.randint(len(ts.pairs), (n,), generator=torch.Generator().manual_seed(3))
    moving_idx = torch.tensor([ts.pairs[i][0] for i in pick.tolist()])
    fixed_idx = torch.tensor([ts.pairs[i][1] for i in pick.tolist()])
    real_theta = torch.as_tensor(tiny.sdm.project(ts.coefficients), dtype=torch.float32)[pick]
    tb, tc = gen.draw(n), gen.draw(n)
    ub, uc = gen.field(tb), gen.field(tc)
    labels = torch.as_tensor(ts.labels)[:, None].float()
    moving, fixed = labels[moving_idx], warp(labels[fixed_idx], uc) > 0.5
    before = dice_batch(warp(moving, ub) > 0.5, fixed).numpy()
    composed = dice_batch(warp(moving, compose(agent.displacement(real_theta + tc - tb), ub)) > 0.5, fixed).numpy()
    sequential = dice_batch(warp(moving, compose(uc, agent.displacement(real_theta))) > 0.5, fixed).numpy()
    extra = sequential - composed
    figure = (f"inter-subject pairs, Dice to fixed: before {before.mean():.3f}, sequential warps {sequential.mean():.3f}, "
              f"composed GT {composed.mean():.3f}: additional error mean {100 * extra.mean():.2f} %, median "
              f"{100 * np.median(extra):.2f} % (paper: < 2 %)")
    print("\n" + figure)
    assert extra.mean() < 0.25 * (sequential.mean() - before.mean()), figure
    assert composed.mean() > before.mean() + 0.1, figure


def test_aligned_pairs_are_identical_images_whose_gt_is_the_start_where_every_move_is_worse(tiny):
    """``aligned=1``: every intra-subject pair has no synthetic difference, so its images are the same and its
    ground truth is the start; Eq. 1's target of every action is then negative (every move is worse)."""
    agent = _agent(tiny)
    fixed, moving, theta_gt, intra = _generator(tiny, agent, seed=5, intra_probability=1.0, aligned=1.0).sample(32)
    assert bool(intra.all()) and torch.equal(fixed, moving)
    torch.testing.assert_close(theta_gt, agent.theta_start.expand(32, -1))
    start = agent.theta_start.expand(32, -1)
    assert bool((q_targets(theta_gt, start, agent.deltas) < 0).all())
    fixed, moving, theta_gt, _ = _generator(tiny, agent, seed=5, intra_probability=1.0, aligned=0.0).sample(32)
    assert not torch.equal(fixed, moving)  # without it, two different draws


@pytest.mark.parametrize("new_subjects", [0.0, 1.0])
def test_intra_pair_gt_reproduces_the_fixed_image(tiny, new_subjects):
    """Intra-subject pairs: the moving image warped by the displacement of theta_gt (what the agent applies at
    theta_gt) reproduces the fixed image up to the negated-inverse approximation; also for pairs of virtual
    subjects (mirrored and deformed), whose images are none of the training subjects'."""
    agent = _agent(tiny)
    gen = _generator(tiny, agent, seed=4, intra_probability=1.0, new_subjects=new_subjects)
    if new_subjects:
        plain = _generator(tiny, agent, seed=4, intra_probability=1.0).sample(96)
        virtual = gen.sample(96)
        assert torch.equal(plain[2], virtual[2])  # the same pairs' parameters; other subjects' images
        assert (plain[0] - virtual[0]).abs().mean() > 0.02
    fixed, moving, theta_gt, intra, fixed_label, moving_label = gen.sample(96, with_labels=True)
    assert bool(intra.all())
    u = agent.displacement(theta_gt)
    error_before = (moving - fixed).abs().mean().item()
    error_after = (warp(moving, u) - fixed).abs().mean().item()
    dice_before = dice_batch(moving_label, fixed_label).mean().item()
    dice_after = dice_batch(warp(moving_label, u, mode="nearest"), fixed_label).mean().item()
    figure = (f"intra pairs: mean |moving - fixed| {error_before:.4f} -> {error_after:.4f} after the GT warp; "
              f"label Dice {dice_before:.3f} -> {dice_after:.3f}")
    print("\n" + figure)
    assert error_after < 0.6 * error_before, figure
    assert dice_after > 0.9, figure


def test_draws_stay_inside_the_real_range(tiny):
    agent = _agent(tiny)
    gen = _generator(tiny, agent, seed=5)
    theta = gen.draw(20_000).double().numpy()
    low, high = tiny.sdm.theta_min - tiny.sdm.mu, tiny.sdm.theta_max - tiny.sdm.mu
    assert np.all(theta >= low - 1e-4) and np.all(theta <= high + 1e-4)
    assert np.all(theta.std(0) > 0.5 * tiny.sdm.sigma), "draws should spread about as the real pairs do"


def test_intra_and_inter_pairs_are_drawn_with_equal_probability(tiny):
    agent = _agent(tiny)
    gen = _generator(tiny, agent, seed=6)
    intra = torch.cat([gen.sample(250)[3] for _ in range(8)]).float().mean().item()
    assert abs(intra - 0.5) < 0.05, f"intra-subject fraction {intra:.3f} of 2000 pairs"


# ----------------------------------------------------------------------------------------- training
def test_short_training_lowers_the_loss_and_beats_chance(tiny, tmp_path):
    torch.manual_seed(0)
    config = _config(iterations=100, batch_size=12, checkpoint_every=100)
    bundle = train(config, tiny.training_set, tiny.sdm, tiny.geometry, torch.device("cpu"), checkpoint=tmp_path / "c.pt")

    columns = training_folder.read_training_loss(tmp_path / "loss.csv")
    assert columns["iteration"] == [50, 100]
    first, last = columns["loss"][0], columns["loss"][-1]
    # best action on fresh held-out synthetic pairs (another seed than training and the built-in check)
    agent = Agent(bundle.network, tiny.sdm, tiny.geometry.size, bundle.action_steps)
    fixed, moving, theta_gt, _ = _generator(tiny, agent, seed=123).sample(256)
    target = q_targets(theta_gt, agent.theta_start.expand(256, -1), agent.deltas)
    accuracy = held_out_accuracy(bundle.network, fixed, moving, target)
    chance = 1 / (2 * tiny.sdm.num_modes)
    figure = (f"loss mean of batches 1-50: {first:.4g}, of 51-100: {last:.4g}; best-action accuracy on 256 held-out "
              f"pairs {accuracy:.3f} (chance {chance:.3f})")
    print("\n" + figure)
    assert last < 0.9 * first, figure
    assert accuracy >= 3 * chance, figure


def test_resumed_training_continues_where_it_stopped(tiny, tmp_path):
    run = lambda config, name: train(config, tiny.training_set, tiny.sdm, tiny.geometry,  # noqa: E731
                                     torch.device("cpu"), checkpoint=tmp_path / name / "c.pt")
    (tmp_path / "whole").mkdir()
    (tmp_path / "resumed").mkdir()
    whole = run(_config(iterations=20), "whole")
    run(_config(iterations=10), "resumed")
    assert torch.load(tmp_path / "resumed" / "c.pt", weights_only=True)["iteration"] == 10
    resumed = run(_config(iterations=20), "resumed")
    state = torch.load(tmp_path / "resumed" / "c.pt", weights_only=True)
    assert state["iteration"] == 20
    assert [h[0] for h in state["history"]] == [10, 20]  # the history continues; iterations 1-10 are not redone
    for name, value in whole.network.state_dict().items():  # the same run as one without interruption
        torch.testing.assert_close(resumed.network.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_checkpoint_older_than_a_configuration_field_resumes_with_its_default(tiny, tmp_path):
    checkpoint = tmp_path / "c.pt"
    run = lambda config: train(config, tiny.training_set, tiny.sdm, tiny.geometry,  # noqa: E731
                               torch.device("cpu"), checkpoint=checkpoint)
    run(_config(iterations=4))
    state = torch.load(checkpoint, weights_only=True)
    for newer in ("wander_sampling", "wander_steps"):  # as a checkpoint made before these fields
        del state["config"][newer]
    torch.save(state, checkpoint)
    run(_config(iterations=6))
    assert torch.load(checkpoint, weights_only=True)["iteration"] == 6
    with pytest.raises(ValueError, match="wander_sampling differ"):  # a real change is still refused
        run(_config(iterations=8, wander_sampling=0.5))


def test_the_training_record_names_the_device_its_batches_ran_on(tiny, tmp_path):
    checkpoint = tmp_path / "c.pt"
    run = lambda iterations: train(_config(iterations=iterations), tiny.training_set, tiny.sdm,  # noqa: E731
                                   tiny.geometry, torch.device("cpu"), checkpoint=checkpoint)
    here = run(4).training["device"]
    assert here.startswith("cpu (") and torch.load(checkpoint, weights_only=True)["device"] == here
    state = torch.load(checkpoint, weights_only=True)
    state["device"] = "cuda (NVIDIA H200)"  # as a checkpoint trained on a GPU machine and brought back
    torch.save(state, checkpoint)
    (tmp_path / "loss.csv").unlink()  # brought back without its loss.csv
    assert run(4).training["device"] == "cuda (NVIDIA H200)"  # a bundle made from it, no batch more: the GPU's
    assert (tmp_path / "loss.csv").read_text().count("\n") == 1 + len(state["history"])  # loss.csv written again
    assert run(6).training["device"] == f"cuda (NVIDIA H200), then {here}"  # resumed here


def test_time_limited_training_stops_checkpoints_and_resumes(tiny, tmp_path):
    checkpoint = tmp_path / "c.pt"
    config = _config(iterations=100_000, checkpoint_every=100_000)
    bundle = train(config, tiny.training_set, tiny.sdm, tiny.geometry, torch.device("cpu"), checkpoint=checkpoint,
                   time_limit=1.0)
    first = torch.load(checkpoint, weights_only=True)["iteration"]
    assert 1 <= first < 100_000
    assert bundle.training["iterations"] == first  # the bundle of the checkpointed iteration
    train(config, tiny.training_set, tiny.sdm, tiny.geometry, torch.device("cpu"), checkpoint=checkpoint, time_limit=0.5)
    state = torch.load(checkpoint, weights_only=True)
    assert state["iteration"] > first
    assert state["history"][-1][0] == state["iteration"]  # the stopping iteration is logged


def test_validation_during_training_equals_validation_of_the_saved_bundle(tiny, tmp_path):
    """The agent validates with the network in evaluation mode, as the saved bundle runs it."""
    ts = tiny.training_set
    pairs = [ValidationPair(ts.images[f], ts.images[m], ts.labels[f], ts.labels[m], f"{m}->{f}")
             for m, f in ts.pairs[:4]]
    config = _config(iterations=20, validate_every=20, validation_steps=30)
    bundle = train(config, ts, tiny.sdm, tiny.geometry, torch.device("cpu"), checkpoint=tmp_path / "c.pt",
                   validation=pairs)
    logged = torch.load(tmp_path / "c.pt", weights_only=True)["history"][-1][3]
    assert logged == pytest.approx(bundle.validation["dice_median"], abs=1e-6)


def test_the_learned_core_imports_without_simpleitk_or_itk():
    """Training and evaluating prepared pairs need torch and numpy only (as on a bare GPU machine)."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('SimpleITK', 'itk'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import AgentRegistrationLib.stages.training, AgentRegistrationLib.stages.evaluation\n"
        "import AgentRegistrationLib.stages.sdm_fit, AgentRegistrationLib.model.bundle\n"
        "import AgentRegistrationLib.stages.training_set, AgentRegistrationLib.stages.training_finish\n"
        "import AgentRegistrationLib.stages.evaluation_pairs, AgentRegistrationLib.stages.evaluation_report\n"
        "assert 'SimpleITK' not in sys.modules and 'itk' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ENGINE_DIR)


def test_default_steps_are_chosen_by_the_dice_of_real_runs_on_training_pairs(tiny):
    """The chosen step count is the best of the measured curve, and the curve is what the agent does: a run of the
    model's default settings (stop rule off) for that many steps gives the curve's Dice there."""
    bundle = load_bundle(tiny.bundle)
    assert bundle.agent_defaults["steps"] == 200 and "steps_chosen_by" not in bundle.agent_defaults  # train() alone
    ts = tiny.training_set
    choice = choose_steps(bundle, ts, pairs=len(ts.pairs), max_steps=60, batch=5)  # every pair, in 3 batches
    curve = np.array(choice["dice_mean_by_step"])
    assert choice["pairs"] == len(ts.pairs) == 12 and curve.shape == (60,)
    best = choice["steps"]
    assert best == int(curve.argmax()) + 1 == bundle.agent_defaults["steps"] and curve[best - 1] == curve.max()
    assert "on 12 real pairs of training subjects" in bundle.agent_defaults["steps_chosen_by"]
    moving, fixed = (list(index) for index in zip(*ts.pairs, strict=True))
    stack = lambda array, index: torch.as_tensor(array[index])[:, None]  # noqa: E731
    result = bundle.agent().run(stack(ts.images, fixed), stack(ts.images, moving),
                                bundle.agent_settings(seed=0, stop_when_no_action_helps=False),
                                stack(ts.labels, moving), stack(ts.labels, fixed))
    assert len(result.trajectory.dice) == best
    assert float(result.trajectory.dice[-1].mean()) == pytest.approx(curve[best - 1], abs=1e-6)


def test_resuming_with_another_configuration_is_refused(tiny, tmp_path):
    train(_config(), tiny.training_set, tiny.sdm, tiny.geometry, torch.device("cpu"), checkpoint=tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"another training configuration \(learning_rate differ\)"):
        train(_config(learning_rate=0.01, iterations=20), tiny.training_set, tiny.sdm, tiny.geometry,
              torch.device("cpu"), checkpoint=tmp_path / "c.pt")


def test_distributed_training_writes_one_bundle(tiny, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo on CPU), with validation on real pairs and the step choice on two of
    them: one bundle, rank 0 writes. On a copy of the tiny ground truth (validation subjects are cached in it)."""
    gt = tmp_path / "gt"
    shutil.copytree(tiny.gt, gt)
    split = tmp_path / "split.json"
    split.write_text('{"train": ["case00", "case04", "case06", "case07"], "validation": ["case02", "case09"]}')
    data = Path(__file__).resolve().parents[3] / "shared" / "data" / "promise12" / "grid128"
    # prepared here once into the copy's cache (as a first training run would), so that neither rank loads elastix
    validation_pairs_from_split(TrainingSet.from_groundtruth(gt), data, split, 2)
    out = tmp_path / "ddp" / "bundle.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ENGINE_DIR), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "AgentRegistrationLib.cli", "train", "--groundtruth", str(gt), "--sdm",
               str(tiny.gt.parent / "sdm.npz"), "--out", str(out), "--device", "cpu", "--progress-json", "--step-pairs", "2",
               "--data", str(data), "--split", str(split), "--set", "iterations=4", "--set", "batch_size=4",
               "--set", "validation_pairs=2", "--set", "validation_steps=3"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"stage": "done"') == 1, done.stdout  # only rank 0 reports
    bundle = load_bundle(out)
    assert bundle.training["device"].startswith("cpu (") and bundle.training["device"].endswith(" x2")
    assert bundle.training["iterations"] == 4
    assert bundle.validation["pairs"] and np.isfinite(bundle.validation["dice_median"])
    assert bundle.training["step_choice"]["pairs"] == 2
    rows = (out.parent / "loss.csv").read_text().splitlines()
    assert rows[0] == "iteration,loss,held_out_accuracy,validation_dice,held_out_near_gt_accuracy"
    assert rows[-1].startswith("4,")
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle.checkpoint.pt", "bundle.pt", "loss.csv"]


# ----------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("architecture", ["paper", "compact"])
@pytest.mark.parametrize("dim", [2, 3])
def test_network_gives_one_q_value_per_action(architecture, dim):
    size = tuple(ModelGeometry.paper(dim).size)
    net = DualStreamQNetwork(NetworkConfig(architecture, dim, size, 2 * (15 if dim == 2 else 25))).eval()
    x = torch.rand(2, 1, *size[::-1])
    with torch.no_grad():
        assert net(x, x).shape == (2, 2 * (15 if dim == 2 else 25))


def test_paper_architecture_matches_the_paper():
    """Section 3: per stream 3 conv (32, 64, 64 filters, kernel 3) and 2 max-pool; FC 128, 128, 64; BN + ReLU."""
    net = DualStreamQNetwork(NetworkConfig("paper", 2, (100, 100), 30))
    for stream in (net.fixed_stream, net.moving_stream):
        convs = [m for m in stream if isinstance(m, torch.nn.Conv2d)]
        assert [c.out_channels for c in convs] == [32, 64, 64]
        assert all(c.kernel_size == (3, 3) for c in convs)
        assert sum(isinstance(m, torch.nn.MaxPool2d) for m in stream) == 2
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in stream) == 3
        assert sum(isinstance(m, torch.nn.ReLU) for m in stream) == 3
    linears = [m for m in net.head if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [128, 128, 64, 30]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.head) == 3
    assert sum(isinstance(m, torch.nn.ReLU) for m in net.head) == 3


def _bundle_3d(architecture: str = "compact") -> ModelBundle:
    """A 3-D bundle on the paper's grid with a 25-mode SDM (fitted to random coefficients: only sizes matter)."""
    geometry = ModelGeometry.paper(3)
    grid: ControlGrid = geometry.control_grid()
    coefficients = np.random.default_rng(0).normal(size=(30, grid.num_coefficients))
    sdm = StatisticalDeformationModel.fit(coefficients, 25, grid)
    net = DualStreamQNetwork(NetworkConfig(architecture, 3, tuple(geometry.size), 50))
    return ModelBundle(net, sdm, geometry, np.ones(25))


def test_compact_3d_bundle_is_small(tmp_path):
    path = _bundle_3d().save(tmp_path / "b.pt")
    size_mb = path.stat().st_size / 2**20
    assert size_mb < 25, f"compact 3-D bundle is {size_mb:.1f} MB"


# ----------------------------------------------------------------------------------------- bundle
def test_bundle_round_trip(tiny, tmp_path):
    bundle = load_bundle(tiny.bundle)
    again = load_bundle(bundle.save(tmp_path / "again.pt"))
    x = torch.as_tensor(tiny.training_set.images[:2])[:, None]
    with torch.no_grad():
        torch.testing.assert_close(again.network(x, x.flip(0)), bundle.network(x, x.flip(0)))
    np.testing.assert_array_equal(again.sdm.modes, bundle.sdm.modes)
    np.testing.assert_array_equal(again.action_steps, bundle.action_steps)
    assert again.geometry == bundle.geometry and again.training == bundle.training


def _payload(tiny) -> dict:
    return torch.load(tiny.bundle, weights_only=True)


def test_truncated_bundle_is_refused(tiny, tmp_path):
    data = tiny.bundle.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="cut.pt is not a readable AgentRegistration model bundle"):
        load_bundle(tmp_path / "cut.pt")


def test_file_that_is_not_a_bundle_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(BundleError, match="other.pt is not an AgentRegistration model bundle"):
        load_bundle(tmp_path / "other.pt")


def test_bundle_of_another_format_version_is_refused(tiny, tmp_path):
    payload = _payload(tiny)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "v99.pt")
    with pytest.raises(BundleError, match="format version 99.*reads version 1"):
        load_bundle(tmp_path / "v99.pt")


def test_bundle_with_mismatched_weight_shapes_is_refused(tiny, tmp_path):
    payload = _payload(tiny)
    state = payload["network"]["state"]
    last = [k for k in state if k.startswith("head.") and k.endswith(".weight")][-1]
    state[last] = torch.zeros(state[last].shape[0] + 2, state[last].shape[1])
    torch.save(payload, tmp_path / "shapes.pt")
    with pytest.raises(BundleError, match="network weights do not fit the compact architecture"):
        load_bundle(tmp_path / "shapes.pt")


def test_bundle_whose_network_does_not_match_its_sdm_is_refused(tiny, tmp_path):
    payload = _payload(tiny)
    payload["network"]["config"]["num_actions"] = 10
    torch.save(payload, tmp_path / "actions.pt")
    with pytest.raises(BundleError, match="10 network outputs .* do not match the SDM's 4 modes"):
        load_bundle(tmp_path / "actions.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA was asked for but no CUDA GPU is available.*--device cpu"):
        resolve_device("cuda")


# ----------------------------------------------------------------------------------------- configuration
def test_override_with_an_unknown_key_is_refused():
    with pytest.raises(ValueError, match="bad training override 'iteratons=5'.*iterations"):
        TrainingConfig().with_overrides(["iteratons=5"])


def test_override_with_a_bad_value_is_refused():
    with pytest.raises(ValueError, match="training override batch_size='many': expected a int"):
        TrainingConfig().with_overrides(["batch_size=many"])


def test_override_changes_only_the_named_fields():
    config = TrainingConfig().with_overrides(["learning_rate=0.01", "iterations=7"])
    assert (config.learning_rate, config.iterations, config.batch_size) == (0.01, 7, 0)


# ----------------------------------------------------------------------------------------- training module glue
def test_training_module_commands_parse_with_the_real_cli(tmp_path):

    files = training_folder.TrainingFiles(tmp_path, "my-model")
    commands = worker_commands.training_commands("python", tmp_path / "data", files, dim=2, configuration="paper", device="CPU")
    stages = ("groundtruth", "sdm", "localiser", "train")  # the default geometry crops on the organ: a localiser
    assert [c[:4] for c in commands] == [["python", "-m", "AgentRegistrationLib.cli", s] for s in stages]
    gt, sdm, localiser, training = (parser.build_parser().parse_args(c[3:]) for c in commands)
    assert (gt.data, gt.out, gt.dim, gt.progress_json) == (str(tmp_path / "data"), str(files.groundtruth), 2, True)
    assert (sdm.groundtruth, sdm.modes, sdm.out) == (str(files.groundtruth), 15, str(files.sdm))
    assert (localiser.data, localiser.out, localiser.dim) == (str(tmp_path / "data"), str(files.localiser), 2)
    assert (training.groundtruth, training.sdm, training.out, training.checkpoint, training.config, training.device) == (
        str(files.groundtruth), str(files.sdm), str(files.bundle), str(files.checkpoint), "paper", "cpu")
    assert training.localiser == [str(files.localiser)] and training.max_minutes is None
    paper = worker_commands.training_commands("python", tmp_path / "data", files, dim=2, geometry="paper")
    assert [c[3] for c in paper] == ["groundtruth", "sdm", "train"]  # the paper's crops need no localiser
    assert parser.build_parser().parse_args(paper[-1][3:]).localiser is None
    limited = worker_commands.training_commands("python", tmp_path / "data", files, dim=2, max_minutes=1.5)[-1]
    assert parser.build_parser().parse_args(limited[3:]).max_minutes == 1.5
    assert files.gt_dice.name == "gt_dice.csv" and files.loss == files.checkpoint.with_name("loss.csv")


def test_a_loss_file_without_the_expected_columns_is_refused(tmp_path):

    (tmp_path / "loss.csv").write_text("step,loss\n50,1.0\n")
    with pytest.raises(ValueError, match=r"lacks the columns \['iteration', 'held_out_accuracy', 'validation_dice'\]"):
        training_folder.read_training_loss(tmp_path / "loss.csv")


def test_progress_text_of_training_messages():

    assert messages.progress_text({"stage": "train", "done": 150, "total": 200, "loss": 0.01234, "accuracy": 0.5}) == (
        "Training: 150 / 200, loss 0.01234, accuracy 0.5")
    assert messages.progress_text({"stage": "error", "message": "no GPU"}) == "Error: no GPU"


def test_states_along_the_way_are_warped_moving_images_between_start_and_gt(tiny):
    from AgentRegistrationLib.stages.training import states_along_the_way

    agent = _agent(tiny)
    gen = _generator(tiny, agent, 3)
    fixed, moving, theta_gt, _ = gen.sample(32)
    start = agent.theta_start.expand(32, -1)
    same_theta, same_moving = states_along_the_way(agent, gen.gen, start, theta_gt, moving, 0.0)
    assert torch.equal(same_theta, start) and torch.allclose(same_moving, moving, atol=1e-5)
    theta, state = states_along_the_way(agent, gen.gen, start, theta_gt, moving, 1.0)
    closer = (theta - theta_gt).norm(dim=1) < (start - theta_gt).norm(dim=1)
    assert closer.float().mean() > 0.7  # on the way to the GT (up to one step of noise)
    assert torch.allclose(state, warp(moving, agent.displacement(theta)))
    assert config_by_name("paper").state_sampling == 0.0  # the paper's configuration trains from the start state


def test_q_targets_in_step_units_are_eq1_divided_by_each_step_squared():
    gen = torch.Generator().manual_seed(1)
    theta_gt, theta = torch.randn(5, 4, generator=gen) * 3, torch.randn(5, 4, generator=gen) * 3
    steps = torch.tensor([0.5, 1.0, 2.0, 4.0])
    deltas = torch.stack([steps, -steps], 1).reshape(-1)
    in_steps = q_targets(theta_gt, theta, deltas, units="steps")
    torch.testing.assert_close(in_steps, q_targets(theta_gt, theta, deltas) / deltas**2)
    r = (theta_gt - theta) / steps  # a mode r steps away: +2r - 1 for the move up, -2r - 1 for the move down
    torch.testing.assert_close(in_steps[:, 0::2], 2 * r - 1)
    torch.testing.assert_close(in_steps[:, 1::2], -2 * r - 1)
    with pytest.raises(ValueError, match="unknown Q-target units 'mm'"):
        q_targets(theta_gt, theta, deltas, units="mm")


def test_near_ground_truth_states_lie_within_half_a_step_where_no_action_helps(tiny):
    from AgentRegistrationLib.stages.training import states_along_the_way

    agent = _agent(tiny)
    gen = _generator(tiny, agent, 4)
    fixed, moving, theta_gt, _ = gen.sample(16)
    start = agent.theta_start.expand(16, -1)
    theta, state = states_along_the_way(agent, gen.gen, start, theta_gt, moving, 0.0, near_gt=1.0)
    assert ((theta - theta_gt).abs() <= agent.action_steps / 2 + 1e-6).all()
    assert (q_targets(theta_gt, theta, agent.deltas, units="steps") <= 0).all()  # every action moves away
    assert torch.allclose(state, warp(moving, agent.displacement(theta)))
    converge = config_by_name("converge")
    assert converge.target_units == "steps" and converge.near_gt_sampling > 0 and converge.stop_rule == 1
    assert config_by_name("paper").target_units == "paper" and config_by_name("paper").near_gt_sampling == 0.0


def test_states_off_the_way_spread_wider_than_the_way_and_leave_converge_unchanged(tiny):
    from AgentRegistrationLib.stages.training import states_along_the_way

    agent = _agent(tiny)
    gen = _generator(tiny, agent, 5)
    fixed, moving, theta_gt, _ = gen.sample(64)
    start = agent.theta_start.expand(64, -1)
    seed = gen.gen.get_state()
    on_way, _ = states_along_the_way(agent, gen.gen, start, theta_gt, moving, 1.0)
    gen.gen.set_state(seed)
    unchanged, _ = states_along_the_way(agent, gen.gen, start, theta_gt, moving, 1.0, wander=0.0)
    assert torch.equal(on_way, unchanged)  # no wandering: the same draws, so converge trains as before
    theta, state = states_along_the_way(agent, gen.gen, start, theta_gt, moving, 0.0, wander=1.0, wander_steps=4.0)
    assert torch.allclose(state, warp(moving, agent.displacement(theta)))

    def off_the_line(t):  # distance from the line start -> GT, in action steps
        way, rel = (theta_gt - start) / agent.action_steps, (t - start) / agent.action_steps
        along = (rel * way).sum(1, keepdim=True) / (way * way).sum(1, keepdim=True)
        return (rel - along * way).norm(dim=1)

    assert off_the_line(theta).median() > 1.5 * off_the_line(on_way).median()
    recover, converge = config_by_name("recover"), config_by_name("converge")
    assert recover.wander_sampling > 0 and converge.wander_sampling == 0
    assert dataclasses.replace(recover, name="converge", wander_sampling=0.0) == converge



def test_intensity_augmentation_changes_contrast_not_geometry_and_is_off_by_default(tiny):
    from AgentRegistrationLib.core.synthetic import augment_intensity

    images = torch.as_tensor(tiny.training_set.images)[:, None].float()
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment_intensity(images, gen, 0.0), images)  # fraction 0: untouched
    changed = augment_intensity(images, gen, 1.0)
    assert changed.shape == images.shape and changed.min() >= 0 and changed.max() <= 1
    assert all(not torch.equal(c, i) for c, i in zip(changed, images, strict=True))  # fraction 1: every image
    for c, i in zip(changed, images, strict=True):  # the anatomy stays where it was: intensities still correlate
        assert np.corrcoef(c.flatten().numpy(), i.flatten().numpy())[0, 1] > 0.8
    again = augment_intensity(images, torch.Generator().manual_seed(0), 0.0)
    assert torch.equal(again, images)
    volumes = torch.rand(2, 1, 12, 10, 6, generator=torch.Generator().manual_seed(1))
    assert augment_intensity(volumes, gen, 1.0).shape == volumes.shape  # 3-D
    assert all(config_by_name(name).augment == 0 for name in ("paper", "compact", "converge", "recover"))


def test_fine_tuning_starts_from_the_given_model_and_refuses_another_sdm(tiny, tmp_path):
    start = train(_config(iterations=4), tiny.training_set, tiny.sdm, tiny.geometry, torch.device("cpu"))
    start.save(tmp_path / "start.pt")
    # learning rate 0: the fine-tuned weights must be exactly those it started from (batch-norm statistics move on)
    tuned = train(_config(iterations=2, learning_rate=0.0, augment=0.5), tiny.training_set, tiny.sdm, tiny.geometry,
                  torch.device("cpu"), checkpoint=tmp_path / "c.pt", init=tmp_path / "start.pt")
    tuned.save(tmp_path / "tuned.pt")
    tuned_weights = dict(tuned.network.named_parameters())
    for name, value in start.network.named_parameters():
        assert torch.equal(tuned_weights[name], value), name
    record = load_bundle(tmp_path / "tuned.pt").training["initialised_from"]
    assert record == {"model": str(tmp_path / "start.pt"), "iterations": 4, "config": "compact"}
    from AgentRegistrationLib.model.card import model_card

    assert "fine-tuning `start.pt` (compact, 4 batches)" in model_card(load_bundle(tmp_path / "tuned.pt"), "tuned")
    resumed = train(_config(iterations=3, learning_rate=0.0, augment=0.5), tiny.training_set, tiny.sdm, tiny.geometry,
                    torch.device("cpu"), checkpoint=tmp_path / "c.pt")
    assert resumed.training["initialised_from"] == record  # kept in the checkpoint
    fewer = StatisticalDeformationModel.fit(tiny.training_set.coefficients, tiny.sdm.num_modes - 1, tiny.sdm.grid)
    with pytest.raises(ValueError, match="fine-tuning needs the same architecture"):
        train(_config(iterations=1), tiny.training_set, fewer, tiny.geometry, torch.device("cpu"),
              init=tmp_path / "start.pt")
