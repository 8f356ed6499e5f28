"""Crops on the organ: the localisation from a label, the crop box placed on it, and the exact way back to the
fixed image's geometry when the moving box is translated and scaled against the fixed one."""

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.metrics import dice
from AgentRegistrationLib.data.organ_box import BOX_SPREADS, localisation_at_point, localisation_from_label
from AgentRegistrationLib.data.preprocessing import (
    ModelFrame,
    displacement_in_fixed_geometry,
    prepare_pair,
    resample_to_frame,
    warp_to_fixed,
)

GEOMETRY = ModelGeometry.localised_grid(3, BOX_SPREADS[3])


def _moved(image: sitk.Image, shift, spacing_factor=1.0) -> sitk.Image:
    """The same voxels stored elsewhere in physical space (another scanner origin, another voxel size)."""
    out = sitk.Image(image)
    out.SetOrigin(tuple(np.array(image.GetOrigin()) + np.asarray(shift)))
    out.SetSpacing(tuple(np.array(image.GetSpacing()) * spacing_factor))
    return out


def test_localisation_from_a_label_is_its_centroid_and_spread_in_physical_units():
    label = sitk.Image(40, 30, 20, sitk.sitkUInt8)
    label.SetSpacing((0.5, 0.7, 3.0))
    label.SetOrigin((10.0, -5.0, 2.0))
    label[10:21, 5:16, 4:9] = 1  # x 10..20, y 5..15, z 4..8
    loc = localisation_from_label(label)
    assert np.allclose(loc.centre, [10 + 15 * 0.5, -5 + 10 * 0.7, 2 + 6 * 3.0])
    std = np.sqrt((np.arange(11) - 5.0).var()), np.sqrt((np.arange(5) - 2.0).var())
    assert np.allclose(loc.spread, [std[0] * 0.5, std[0] * 0.7, std[1] * 3.0])
    with pytest.raises(ValueError, match="empty"):
        localisation_from_label(label * 0)
    with pytest.raises(ValueError, match="positive spread"):
        localisation_at_point([0, 0, 0], [1, 0, 1])


def test_the_box_spans_its_spreads_around_the_centre(load_case):
    image, label = load_case("13")
    loc = localisation_from_label(label)
    frame = ModelFrame.on_localisation(image, GEOMETRY, loc)
    size = np.array(GEOMETRY.size)
    assert np.allclose(frame.to_physical((size - 1) / 2), loc.centre)
    assert np.allclose(frame.spacing * (size - 1), np.array(BOX_SPREADS[3]) * loc.spread)
    box = resample_to_frame(label, frame, label=True)
    assert box.sum() == pytest.approx(label_voxels_in_model(label, frame), rel=0.1)
    assert box[0].sum() == 0 and box[-1].sum() == 0  # the organ lies inside the box, with a margin


def label_voxels_in_model(label, frame) -> float:
    """The label's volume in model voxels."""
    return sitk.GetArrayViewFromImage(label).sum() * np.prod(label.GetSpacing()) / np.prod(frame.spacing)


def test_a_moving_image_stored_40_mm_away_with_other_voxels_gives_the_same_crops(load_case):
    """The atlas case: the moving crop is placed by its own label, wherever the scanner put the image."""
    image, label = load_case("13")
    moving, moving_label = (_moved(im, (40.0, -25.0, 12.0), 1.3) for im in (image, label))
    fixed_loc = localisation_from_label(label)
    pair = prepare_pair(image, moving, GEOMETRY, label, moving_label, fixed_localisation=fixed_loc,
                        moving_localisation=localisation_from_label(moving_label))
    assert dice(pair.moving_label, pair.fixed_label) > 0.99
    assert np.abs(pair.moving - pair.fixed).max() < 1e-3
    assert "localisation" in pair.info


def test_zero_deformation_maps_the_moving_box_onto_the_fixed_box_in_the_fixed_geometry(load_case):
    """Fixed and moving boxes differ by a translation and a scaling; the displacement field in the fixed image's
    own geometry carries the moving label onto the fixed one (here the same anatomy, moved and rescaled)."""
    image, label = load_case("17")
    moving_label = _moved(label, (-30.0, 8.0, -6.0), 0.8)
    fixed_loc, moving_loc = localisation_from_label(label), localisation_from_label(moving_label)
    frame = ModelFrame.on_localisation(image, GEOMETRY, fixed_loc)
    moving_frame = ModelFrame.on_localisation(moving_label, GEOMETRY, moving_loc, direction=frame.direction)
    grid = GEOMETRY.control_grid()
    field = displacement_in_fixed_geometry(np.zeros(grid.num_coefficients), grid, frame, label, moving_frame)
    assert field.GetSize() == label.GetSize() and field.GetOrigin() == label.GetOrigin()
    warped = warp_to_fixed(moving_label, field, label=True)
    assert dice(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(label)) > 0.97
    # the field at the fixed box's centre points to the moving box's centre
    index = label.TransformPhysicalPointToIndex(fixed_loc.centre.tolist())
    vector = np.array(field[index])
    point = np.array(label.TransformIndexToPhysicalPoint(index))
    assert np.allclose(point + vector, moving_frame.to_physical(frame.to_model(point)), atol=1e-6)


def test_a_two_d_model_takes_the_slice_nearest_the_organ_centre(load_case):
    image, label = load_case("02")
    geometry = ModelGeometry.localised_grid(2, BOX_SPREADS[2]).slab()
    loc = localisation_from_label(label)
    frame = ModelFrame.on_localisation(image, geometry, loc)
    z = image.TransformPhysicalPointToContinuousIndex(frame.origin.tolist())[2]
    centre_z = image.TransformPhysicalPointToContinuousIndex(loc.centre.tolist())[2]
    assert z == pytest.approx(round(centre_z)) and frame.size == (100, 100, 1)


def test_geometry_without_box_spreads_is_the_papers_crop(tmp_path):
    paper = ModelGeometry.paper(3)
    assert not paper.localised and GEOMETRY.localised
    assert ModelGeometry.from_dict({k: v for k, v in paper.to_dict().items() if k != "box_spreads"}) == paper
    assert ModelGeometry.from_dict(GEOMETRY.to_dict()) == GEOMETRY
    with pytest.raises(ValueError, match="box spreads"):
        ModelGeometry((75, 75, 20), (16.0, 16.0, 8.0), box_spreads=(10.0, 10.0))
