"""Value sets shared by the settings and the engines, kept free of torch so the command line can
show them without importing an engine."""

from __future__ import annotations

# Image sources of a CNN search: CIFAR-10 (folder or .npz), any .npz image set, the bundled digits, or
# a folder of class sub-folders.
DATASETS = ("cifar10", "npz", "digits", "folder")
# Image sources of CNN training (``train cifar10``).
TRAIN_DATASETS = ("cifar10", "folder")

# How the batch is shared among processes under torchrun.
GLOBAL_BATCH_CHOICES = ("scale", "keep")

# Mixed precision settings of CNN training and testing.
AMP_CHOICES = ("auto", "bf16", "fp16", "off")

# The paper's evaluation networks (appendix A.2.1 for CIFAR-10, A.2.3 for ImageNet).
NETWORK_DEFAULTS: dict[str, dict[str, int]] = {
    "cifar10": {"init_channels": 36, "layers": 20, "num_classes": 10, "image_size": 32},
    "imagenet": {"init_channels": 48, "layers": 14, "num_classes": 1000, "image_size": 224},
}

# Recurrent evaluation networks of the paper (appendix A.2.2 for PTB, A.2.4 for WikiText-2): (units, vocabulary).
RNN_NETWORKS = {"ptb": (850, 10000), "wt2": (700, 33278)}

# Intermediate nodes of the recurrent search cell (paper section 3.1.2).
RNN_STEPS = 8
