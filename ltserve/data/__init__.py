"""Data sets: readers (Fashion-MNIST IDX, image folders, split lists), splits and the long-tail maker, augmentation.

    imageset.py       ImageSet (in memory or files), Splits
    readers.py        IDX, class-name files, split lists, image folders
    fashion_mnist.py  find / download / read Fashion-MNIST; write sample PNGs
    longtail.py       the long-tail maker and seeded stratified splits
    splits.py         load_splits(cfg.data): train / val / test + fingerprint
    augment.py        training augmentation (NumPy + Pillow)

NumPy and Pillow only (no torch), so stage 2, evaluation and the batch tools read data without the training stack.
"""

from ltserve.data.augment import TrainTransform, build_train_transform
from ltserve.data.fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, download_fashion_mnist,
                                        find_fashion_mnist, read_fashion_mnist, user_cache_dir, write_samples)
from ltserve.data.imageset import ImageSet, Splits
from ltserve.data.longtail import (balanced_draw, longtail_counts, longtail_order, make_longtail, stratified_split,
                                   stratified_subsample)
from ltserve.data.readers import IMAGE_EXTENSIONS, read_idx, read_image_folder, read_names_file, read_split_list
from ltserve.data.splits import load_splits

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_FILES", "IMAGE_EXTENSIONS", "ImageSet", "Splits", "TrainTransform",
           "build_train_transform", "balanced_draw", "download_fashion_mnist", "find_fashion_mnist",
           "longtail_counts", "longtail_order", "load_splits", "make_longtail", "read_fashion_mnist", "read_idx",
           "read_image_folder", "read_names_file", "read_split_list", "stratified_split", "stratified_subsample",
           "user_cache_dir", "write_samples"]
