"""Make a proxy "second organ" data set from the shared PROMISE12 grid128 subjects (issue 15).

Issue 15 asks whether the "Train a model for your own organ" guide (docs/own-organ.md) works on another organ's
data: about 30 small, isotropically sampled, two-label MR volumes (the issue's example: a small brain structure,
1 mm voxels, volumes of about 35x50x35 voxels, two labels). No such data are at hand, so this script makes a proxy of that
geometry from the 40 PROMISE12 subjects of ``grid128`` (32x128x128 voxels, nominal spacing 1, taken as mm):

- a box of fixed physical size (``SOURCE_BOX``, grid128 units) centred on each subject's prostate-mask centroid is
  resampled onto an output grid of ``OUT_SIZE`` voxels (x, y, z) with isotropic 1 mm spacing written in the header
  (so the anatomy is rescaled anisotropically into a different shape; the image is Gaussian-smoothed along the
  axes that are shrunk, then linearly interpolated; the label by nearest neighbour; outside the source volume 0);
- the mask is split into two labels at the subject's own centroid along x (label 1: x below it, label 2: the rest);
- each subject gets its own, non-identity origin (identity direction), so that nothing may rely on the origin;
- the output is checked: no label voxel on the box's border (the organ is not cut) and both labels present.

It writes ``<name>_image.nii.gz`` (int16) and ``<name>_label.nii.gz`` (uint8, 0/1/2) into ``--out`` and a split
JSON (``--split-out``) with the same ``train`` and ``validation`` subjects as ``--split``.

    python scripts/experiments/make_second_organ.py --src ../shared/data/promise12/grid128 --out /work/organ2/data \\
        --split Resources/promise12_split.json --split-out /work/organ2/split.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

OUT_SIZE = (36, 52, 36)  # output voxels x, y, z (1 mm isotropic)
SOURCE_BOX = (84.0, 80.0, 36.0)  # physical box in the source (grid128 units) mapped onto OUT_SIZE, x, y, z


def subject_origin(index: int) -> tuple[float, float, float]:
    """A distinct, non-identity origin per subject (mm)."""
    return (-91.5 + 7.25 * index, 37.0 - 4.5 * index, -18.25 + 3.0 * (index % 7))


def convert(image: sitk.Image, label: sitk.Image, origin: tuple[float, float, float]) -> tuple[sitk.Image, sitk.Image]:
    """Resample one subject onto the proxy grid and split its mask into two labels."""
    mask = sitk.GetArrayFromImage(label) > 0  # z, y, x
    if not mask.any():
        raise ValueError("empty mask")
    centroid_index = np.argwhere(mask).mean(axis=0)[::-1]  # x, y, z (continuous index)
    centre_src = np.array(label.TransformContinuousIndexToPhysicalPoint([float(c) for c in centroid_index]))
    src_spacing = np.array(label.GetSpacing())
    out_spacing = np.ones(3)
    scale = np.array(SOURCE_BOX) / (np.array(OUT_SIZE) * out_spacing)  # source units per output mm
    out_origin = np.array(origin)
    centre_out = out_origin + (np.array(OUT_SIZE) - 1) / 2.0 * out_spacing
    # output physical point p -> source point centre_src + S (p - centre_out)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(np.diag(scale).ravel().tolist())
    transform.SetCenter(centre_out.tolist())
    transform.SetTranslation((centre_src - centre_out).tolist())

    sigma = [0.5 * max(s - 1.0, 0.0) * sp for s, sp in zip(scale, src_spacing, strict=True)]
    smooth = sitk.Cast(image, sitk.sitkFloat32)
    if any(s > 0 for s in sigma):
        smooth = sitk.SmoothingRecursiveGaussian(smooth, [max(s, 1e-3) for s in sigma])

    def resample(img: sitk.Image, interpolator: int) -> sitk.Image:
        return sitk.Resample(img, list(OUT_SIZE), transform, interpolator, out_origin.tolist(), out_spacing.tolist(),
                             np.eye(3).ravel().tolist(), 0.0, img.GetPixelID())

    out_image = resample(smooth, sitk.sitkLinear)
    out_image = sitk.Cast(sitk.Round(out_image), sitk.sitkInt16)
    out_mask = sitk.GetArrayFromImage(resample(sitk.Cast(label > 0, sitk.sitkUInt8), sitk.sitkNearestNeighbor)) > 0
    if not out_mask.any():
        raise ValueError("mask lost in resampling")
    border = np.zeros_like(out_mask)
    border[[0, -1], :, :] = border[:, [0, -1], :] = border[:, :, [0, -1]] = True
    if (out_mask & border).any():
        raise ValueError("organ cut by the box: enlarge SOURCE_BOX")
    split_x = np.argwhere(out_mask)[:, 2].mean()
    xs = np.arange(out_mask.shape[2])[None, None, :]
    labels = np.where(out_mask, np.where(xs < split_x, 1, 2), 0).astype(np.uint8)
    if set(np.unique(labels)) != {0, 1, 2}:
        raise ValueError("a label is empty")
    out_label = sitk.GetImageFromArray(labels)
    out_label.CopyInformation(out_image)
    return out_image, out_label


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/data/promise12/grid128"))
    parser.add_argument("--out", type=Path, required=True, help="output data folder")
    parser.add_argument("--split", type=Path, default=Path("Resources/promise12_split.json"))
    parser.add_argument("--split-out", type=Path, required=True, help="split JSON to write")
    args = parser.parse_args(argv)

    split = json.loads(args.split.read_text())
    names = sorted(set(split["train"]) | set(split["validation"]))
    args.out.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        image = sitk.ReadImage(str(args.src / f"{name}_image.nii.gz"))
        label = sitk.ReadImage(str(args.src / f"{name}_label.nii.gz"))
        out_image, out_label = convert(image, label, subject_origin(index))
        sitk.WriteImage(out_image, str(args.out / f"{name}_image.nii.gz"), useCompression=True)
        sitk.WriteImage(out_label, str(args.out / f"{name}_label.nii.gz"), useCompression=True)
        counts = np.bincount(sitk.GetArrayFromImage(out_label).ravel(), minlength=3)
        print(f"{name}: size {out_image.GetSize()} origin {out_image.GetOrigin()} label voxels 1:{counts[1]} 2:{counts[2]}")
    args.split_out.parent.mkdir(parents=True, exist_ok=True)
    args.split_out.write_text(json.dumps({
        "description": f"Proxy second organ (scripts/experiments/make_second_organ.py) from {args.src}; "
                       f"the subjects of {args.split}.",
        "train": split["train"],
        "validation": split["validation"],
    }, indent=1) + "\n")
    print(f"{len(names)} subjects -> {args.out}; split -> {args.split_out}")


if __name__ == "__main__":
    main()
