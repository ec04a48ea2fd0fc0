"""Pose augmentation of preprocessed samples: quarter turns about the camera's viewing axis.

Why: parts on a conveyor or a table lie in any in-plane orientation, and a training set of a few
dozen images covers few of them. The lite 2D descriptors (orientation histograms, the census code)
depend on the image orientation, so a part turned by an angle the training set never showed
gives descriptors that lie far from every training pixel although nothing is wrong with it. A
memory bank built from turned copies of the training images as well covers those poses
(``mafr train --memory-bank N --bank-rotations 4``). With ``--extractor-option
rgb.hog_invariant=true --extractor-option rgb.census_invariant=true`` every lite channel, 2D and
3D, is unchanged under these turns (tested), so the turned copies only repeat pixels and the
option is not needed (docs/real_parts.md, "More options").

Only quarter turns: they move pixels exactly (no resampling of the organised cloud, whose
invalid pixels and depth edges would be smeared by interpolation). Mirror images are not made: a
mirrored part is a different part (thread handedness, chirality).

A turn is a rigid rotation of the scene about the grid's viewing axis: the organised grid is
turned by ``np.rot90`` and the points' x, y coordinates are turned with it (z is unchanged), so
that x still grows along the grid's columns and y along its rows, as in every camera frame, and
surface normals, heights and curvatures stay consistent with the image. The light stays where it
was relative to the camera in the real scene; in a turned copy it comes from a turned direction.
That is part of what the option trades (see docs/real_parts.md).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .preprocess import ModelInput


def quarter_turn(sample: ModelInput, turns: int) -> ModelInput:
    """``sample`` turned by ``turns`` x 90 degrees counter-clockwise as displayed (``np.rot90``).

    Returns new contiguous arrays; ``sample`` is not changed. The grid frame (the mapping back to
    the input image) is kept as it is: turned samples are for training only.
    """
    k = int(turns) % 4
    if sample.rgb.shape[-1] != sample.rgb.shape[-2]:
        raise ValueError(f"quarter_turn needs a square grid, got {sample.rgb.shape[-2:]}")
    rgb = np.ascontiguousarray(np.rot90(sample.rgb, k, axes=(-2, -1)))
    valid = np.ascontiguousarray(np.rot90(sample.valid, k, axes=(-2, -1)))
    xyz = np.ascontiguousarray(np.rot90(sample.xyz, k, axes=(-2, -1)))
    # np.rot90 by one step sends grid column u to row (S-1-u) and row v to column v, so in the
    # camera's axes (x along columns, y along rows) the points turn as (x, y) -> (y, -x).
    x, y = xyz[0].copy(), xyz[1].copy()
    for _ in range(k):
        x, y = y, -x
    xyz[0], xyz[1] = x, y
    xyz[:, ~valid] = 0.0  # invalid points stay exactly 0 (-0.0 from the negation otherwise)
    return dataclasses.replace(sample, rgb=rgb, xyz=xyz.astype(np.float32, copy=False), valid=valid)
