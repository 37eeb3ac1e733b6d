"""rs-transfer: ResNet-RS models, the RS training recipe, transfer and video tasks, and honest benchmarks."""

__version__ = "0.1.0"
