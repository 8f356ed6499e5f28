"""The engine's one wrapper around elastix/transformix (itk-elastix).

Used for the translation pre-alignment (paper, section 3; its policy is :mod:`preprocessing`'s), the ground-truth B-spline
registrations constrained by corresponding points, the e8/e16 baselines, and the check
that our B-spline FFD equals transformix's. Images go in and out as SimpleITK images.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import itk
import numpy as np
import SimpleITK as sitk
import torch

from AgentRegistrationLib.core.bspline import ControlGrid


def single_threaded_worker() -> None:
    """In a worker process of a pool: one ITK (elastix) thread and one torch thread, so that the
    workers do not oversubscribe the cores."""
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    torch.set_num_threads(1)


def model_image(array: np.ndarray) -> sitk.Image:
    """A model-space array as a SimpleITK image (spacing 1, origin 0: coefficients in voxels), what elastix registers
    on the model grid."""
    return sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))


def to_itk(image: sitk.Image) -> itk.Image:
    """SimpleITK scalar image -> float32 ITK image with the same geometry."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    out = itk.image_from_array(np.ascontiguousarray(arr))
    dim = image.GetDimension()
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(itk.matrix_from_array(np.array(image.GetDirection()).reshape(dim, dim)))
    return out


def _parameter_object(maps: list[dict]) -> itk.ParameterObject:
    po = itk.ParameterObject.New()
    for m in maps:
        po.AddParameterMap({k: [str(x) for x in (v if isinstance(v, list | tuple) else [v])] for k, v in m.items()})
    return po


def default_map(kind: str, **overrides) -> dict:
    """elastix's default parameter map of ``kind`` ('translation', 'bspline'), with overrides."""
    po = itk.ParameterObject.New()
    m = {k: list(v) for k, v in dict(po.GetDefaultParameterMap(kind, overrides.pop("resolutions", 4))).items()}
    m.update({k: v if isinstance(v, list) else [v] for k, v in overrides.items()})
    return m


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    maps: list[dict],
    fixed_points: np.ndarray | None = None,
    moving_points: np.ndarray | None = None,
) -> list[dict]:
    """Run elastix; returns the transform parameter maps (as plain dicts of string lists).

    With ``fixed_points``/``moving_points`` (``(N, dim)`` physical coordinates), the maps may use
    ``CorrespondingPointsEuclideanDistanceMetric``.
    """
    kwargs = {"parameter_object": _parameter_object(maps), "log_to_console": False}
    with tempfile.TemporaryDirectory(prefix="agentreg-elastix-") as tmp:
        if fixed_points is not None:
            kwargs["fixed_point_set_file_name"] = _write_points(Path(tmp) / "fixed.txt", fixed_points)
            kwargs["moving_point_set_file_name"] = _write_points(Path(tmp) / "moving.txt", moving_points)
        _, transform = itk.elastix_registration_method(to_itk(fixed), to_itk(moving), **kwargs)
    return [
        {k: list(v) for k, v in dict(transform.GetParameterMap(i)).items()}
        for i in range(transform.GetNumberOfParameterMaps())
    ]


def _write_points(path: Path, points: np.ndarray) -> str:
    lines = ["point", str(len(points))] + [" ".join(f"{c:.6f}" for c in p) for p in points]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def translation(fixed: sitk.Image, moving: sitk.Image) -> np.ndarray:
    """elastix's translation registration of ``moving`` to ``fixed`` (Mattes mutual information, 3 resolutions):
    the translation ``t`` (physical units) with ``fixed(x) ~ moving(x + t)``. Raises ``RuntimeError`` when elastix
    fails (when to trust its result is the caller's policy: :func:`preprocessing.prealign_translation`)."""
    parameter_map = default_map("translation", resolutions=3, MaximumStepLength="2.0", NumberOfSpatialSamples="4096",
                                MaximumNumberOfIterations="300", RequiredRatioOfValidSamples="0.05")
    maps = register(fixed, moving, [parameter_map])
    return np.array([float(v) for v in maps[0]["TransformParameters"]])


def bspline_map(grid_spacing: tuple[float, ...], iterations: int = 500, resolutions: int = 3,
                points_weight: float | None = None, bending_weight: float | None = None) -> dict:
    """A B-spline map after a translation: elastix's defaults (Mattes MI), final grid spacing
    ``grid_spacing`` in physical units, optionally bending energy and corresponding points."""
    m = default_map(
        "bspline",
        resolutions=resolutions,
        FinalGridSpacingInPhysicalUnits=[repr(float(s)) for s in grid_spacing],
        MaximumNumberOfIterations=str(iterations),
        WriteResultImage="false",
    )
    m.pop("FinalGridSpacingInVoxels", None)
    metrics = ["AdvancedMattesMutualInformation"]
    weights = ["1.0"]
    if bending_weight is not None:
        metrics.append("TransformBendingEnergyPenalty")
        weights.append(repr(float(bending_weight)))
    if points_weight is not None:
        metrics.append("CorrespondingPointsEuclideanDistanceMetric")
        weights.append(repr(float(points_weight)))
    m["Metric"] = metrics
    if len(metrics) > 1:
        m["Registration"] = ["MultiMetricMultiResolutionRegistration"]
        for i, w in enumerate(weights):
            m[f"Metric{i}Weight"] = [w]
    return m


def bspline_coefficients(parameter_map: dict) -> tuple[np.ndarray, ControlGrid]:
    """Coefficient vector and control grid of a B-spline transform parameter map."""
    return np.array([float(v) for v in parameter_map["TransformParameters"]]), ControlGrid.from_elastix_map(
        parameter_map
    )


def bspline_transform_map(coefficients: np.ndarray, grid: ControlGrid, reference: sitk.Image) -> dict:
    """A transformix map for our coefficients on ``grid`` over ``reference`` (identity direction)."""
    dim = grid.dim
    m = {
        "Transform": ["BSplineTransform"],
        "NumberOfParameters": [str(len(coefficients))],
        "TransformParameters": [repr(float(c)) for c in coefficients],
        "InitialTransformParameterFileName": ["NoInitialTransform"],
        "HowToCombineTransforms": ["Compose"],
        "FixedImageDimension": [str(dim)],
        "MovingImageDimension": [str(dim)],
        "FixedInternalImagePixelType": ["float"],
        "MovingInternalImagePixelType": ["float"],
        "Size": [str(s) for s in reference.GetSize()],
        "Index": ["0"] * dim,
        "Spacing": [repr(float(s)) for s in reference.GetSpacing()],
        "Origin": [repr(float(o)) for o in reference.GetOrigin()],
        "Direction": [repr(float(d)) for d in reference.GetDirection()],
        "UseDirectionCosines": ["true"],
        "BSplineTransformSplineOrder": ["3"],
        "UseCyclicTransform": ["false"],
        "ResampleInterpolator": ["FinalBSplineInterpolator"],
        "FinalBSplineInterpolationOrder": ["3"],
        "Resampler": ["DefaultResampler"],
        "DefaultPixelValue": ["0"],
        "ResultImageFormat": ["nii"],
        "ResultImagePixelType": ["float"],
        "CompressResultImage": ["false"],
    }
    m.update(grid.elastix_map())
    return m


def transformix_displacement(maps: list[dict], reference: sitk.Image) -> np.ndarray:
    """transformix's deformation field on ``reference``'s grid: array ``(*array shape, dim)``,
    physical units, component order (x, y[, z])."""
    with tempfile.TemporaryDirectory(prefix="agentreg-transformix-") as tmp:  # transformix writes a file there
        field = itk.transformix_deformation_field(to_itk(reference), _parameter_object(maps), output_directory=tmp)
        return np.asarray(itk.array_from_image(field), dtype=np.float64).copy()


def resample_with(maps: list[dict], moving: sitk.Image, label: bool = False) -> sitk.Image:
    """Apply elastix transform maps to an image (B-spline order 3, or nearest for labels)."""
    maps = [dict(m) for m in maps]
    if label:
        maps[-1]["FinalBSplineInterpolationOrder"] = ["0"]
    filt = itk.TransformixFilter.New(Input=to_itk(moving), TransformParameterObject=_parameter_object(maps))
    filt.SetLogToConsole(False)
    filt.Update()
    arr = itk.array_from_image(filt.GetOutput())
    ref = maps[-1]
    out = sitk.GetImageFromArray(np.rint(arr).astype(np.uint8) if label else arr.astype(np.float32))
    out.SetOrigin([float(v) for v in ref["Origin"]])
    out.SetSpacing([float(v) for v in ref["Spacing"]])
    out.SetDirection([float(v) for v in ref["Direction"]])
    return out
