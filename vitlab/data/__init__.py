"""Datasets, augmentation and the batch loader.

    splits = load_data("../shared/datasets/cifar10-jpeg-train.tar.gz")   # 45,000 train / 5,000 val
    loader = BatchLoader(splits.train, 128, mean=splits.mean, std=splits.std, train=True,
                         augment=augment_preset("light"))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, targets in loader: ...
"""

from .augment import AugmentConfig, augment_preset
from .image import load_image
from .imageset import DataSplits, ImageSet
from .loader import BatchLoader
from .sources import load_data

__all__ = ["AugmentConfig", "BatchLoader", "DataSplits", "ImageSet", "augment_preset", "load_data", "load_image"]
