"""Triton kernels and their launchers (no autograd, no public API: see tscd/kernels/<op>.py)."""
