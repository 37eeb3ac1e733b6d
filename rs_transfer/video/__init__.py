"""Kinetics-400 video classification with 3D ResNet-RS: data, clip sampling, 30-view evaluation, the task."""
