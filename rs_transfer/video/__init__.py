"""Video classification with 3D ResNet-RS (Kinetics-400 or your own videos): data, clip sampling, 30-view
evaluation, the task."""
