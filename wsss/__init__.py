"""wsss: co-attention classifier for weakly supervised semantic segmentation."""

__version__ = "0.1.0"
