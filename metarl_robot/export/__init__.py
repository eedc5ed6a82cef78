"""Torch → ONNX export of trained models into policy bundles (``bundle.yaml`` + graphs). Needs torch and onnx.

The robot side reads bundles with :mod:`metarl_robot.runtime.bundle`, which never imports torch.
"""

from __future__ import annotations
