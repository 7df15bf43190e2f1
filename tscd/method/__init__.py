"""The methods: their label logic and losses, shared by training and evaluation, and the recipes that combine
them into a training iteration (layers point down: train and eval use this package, never the reverse).

* :mod:`tscd.method.labels`: CAM -> label (:func:`cam_to_label`), the image VARM/PAR see (:func:`varm_image`),
  VARM/PAR pseudo labels (:func:`refine_cams_with_bkg`, and the official per-image structure
  :func:`refine_cams_with_bkg_sequential`), affinity labels (:func:`affinity_label`), :func:`box_mask`, AFA's
  affinity-propagated label (:func:`refine_propagated_cams`).
* :mod:`tscd.method.random_walk`: affinity-refined CAMs (AFA's random walk).
* :mod:`tscd.method.losses`: the loss terms the recipes share and the counts that normalise them.
* :mod:`tscd.method.recipes`: the recipe interface, its registry and the recipes (``tscd``, ``afa``); imported on
  its own (``from tscd.method.recipes import ...``), not by this package.
"""
from tscd.method.labels import (
    affinity_label,
    box_mask,
    cam_to_label,
    refine_cams_with_bkg,
    refine_cams_with_bkg_sequential,
    refine_propagated_cams,
    varm_image,
)
from tscd.method.random_walk import affinity_cam_label, propagate_cam_with_bkg, radius_mask, transition_matrix

__all__ = ["affinity_cam_label", "affinity_label", "box_mask", "cam_to_label", "propagate_cam_with_bkg",
           "radius_mask", "refine_cams_with_bkg", "refine_cams_with_bkg_sequential", "refine_propagated_cams",
           "transition_matrix", "varm_image"]
