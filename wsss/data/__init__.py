"""Datasets in the PASCAL VOC 2012 layout, joint image/mask transforms, the embedded benchmark."""
