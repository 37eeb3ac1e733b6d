"""Transfer tasks of the paper's Table 5 (CIFAR-100, VOC detection and segmentation, ADE20K, NYU depth) on the
shared backbone and engine: datasets in their distributed layouts, FPN heads, metrics, the fine-tuning grid."""
