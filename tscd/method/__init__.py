"""The method's label logic, shared by training and evaluation (layers point down: train and eval use it).

* :mod:`tscd.method.labels`: CAM -> label (:func:`cam_to_label`), the image VARM sees (:func:`varm_image`),
  VARM pseudo labels (:func:`refine_cams_with_bkg`, and the official per-image structure
  :func:`refine_cams_with_bkg_sequential`), affinity labels (:func:`affinity_label`), :func:`box_mask`.
* :mod:`tscd.method.random_walk`: affinity-refined CAMs (AFA's random walk).
"""
from tscd.method.labels import (
    affinity_label,
    box_mask,
    cam_to_label,
    refine_cams_with_bkg,
    refine_cams_with_bkg_sequential,
    varm_image,
)
from tscd.method.random_walk import affinity_cam_label, propagate_cam_with_bkg, radius_mask, transition_matrix

__all__ = ["affinity_cam_label", "affinity_label", "box_mask", "cam_to_label", "propagate_cam_with_bkg",
           "radius_mask", "refine_cams_with_bkg", "refine_cams_with_bkg_sequential", "transition_matrix",
           "varm_image"]
