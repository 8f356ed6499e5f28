"""PCA statistical deformation model: projection, reconstruction, persistence, grid checks."""

import numpy as np
import pytest
import torch
from AgentRegistrationLib.core.bspline import ControlGrid, dense_displacement
from AgentRegistrationLib.core.sdm import StatisticalDeformationModel

GRID = ControlGrid.for_image((100, 100), (16.0, 16.0))


def _low_rank_data(n=40, rank=6, seed=0):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, GRID.num_coefficients))
    return rng.normal(size=(n, rank)) * np.arange(rank, 0, -1) @ basis + rng.normal(size=GRID.num_coefficients)


def test_reconstruction_is_exact_with_enough_modes():
    data = _low_rank_data()
    sdm = StatisticalDeformationModel.fit(data, 6, GRID)
    assert np.allclose(sdm.reconstruct(sdm.project(data)), data, atol=1e-8)
    assert np.allclose(sdm.modes @ sdm.modes.T, np.eye(6), atol=1e-10)
    assert np.all(np.diff(sdm.sigma) <= 1e-12) and sdm.explained_variance_ratio.sum() == pytest.approx(1.0)
    fewer = StatisticalDeformationModel.fit(data, 3, GRID)
    assert np.abs(fewer.reconstruct(fewer.project(data)) - data).max() > 0.1


def test_mode_fields_are_dense_displacements_of_the_agents_deformation():
    sdm = StatisticalDeformationModel.fit(_low_rank_data(), 4, GRID)
    bases = GRID.image_bases((100, 100), dtype=torch.float64)
    mean, modes = sdm.fields(bases)
    theta = np.array([0.5, -1.0, 0.0, 2.0])
    direct = dense_displacement(torch.tensor(sdm.deformation(theta))[None], GRID, bases)[0]
    assert torch.allclose(mean + torch.einsum("m,m...->...", torch.tensor(theta), modes), direct, atol=1e-9)


def test_identity_parameters_give_no_deformation():
    sdm = StatisticalDeformationModel.fit(_low_rank_data(), 4, GRID)  # the data's mean is far from zero
    assert np.abs(sdm.deformation(sdm.theta_identity)).max() < 1e-9
    theta = sdm.theta_identity + np.array([1.0, 0.0, -2.0, 0.5])
    assert np.allclose(sdm.deformation(theta), np.array([1.0, 0.0, -2.0, 0.5]) @ sdm.modes)


def test_save_load_round_trip(tmp_path):
    sdm = StatisticalDeformationModel.fit(_low_rank_data(), 5, GRID)
    loaded = StatisticalDeformationModel.load(sdm.save(tmp_path / "sdm.npz"))
    assert loaded.grid == GRID
    for k, v in sdm.to_arrays().items():
        if k != "grid_json":
            assert np.array_equal(getattr(loaded, k), v)


def test_grid_mismatch_is_a_clear_error():
    sdm = StatisticalDeformationModel.fit(_low_rank_data(), 5, GRID)
    with pytest.raises(ValueError, match="rebuild the SDM"):
        sdm.check_grid(ControlGrid.for_image((100, 100), (8.0, 8.0)))
    with pytest.raises(ValueError, match="control grid"):
        StatisticalDeformationModel.fit(np.zeros((10, 7)), 2, GRID)
    with pytest.raises(ValueError, match="do not match"):
        sdm.project(np.zeros(7))


def test_too_many_modes_and_corrupt_file(tmp_path):
    with pytest.raises(ValueError, match="at most 9"):
        StatisticalDeformationModel.fit(_low_rank_data(n=10), 15, GRID)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="cannot read SDM"):
        StatisticalDeformationModel.load(bad)
