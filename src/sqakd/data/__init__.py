"""Images in, batches out: readers by format name, a decode cache, batched augmentation, a loader.

``load_images(format, root, split)`` returns an :class:`ImageArray` (uint8 NHWC + labels);
:class:`BatchLoader` turns it into float NCHW batches, optionally through :class:`BatchAugment`.
"""

from . import cifar, folder, idx, unlabeled  # noqa: F401  (registers every format)
from .arrays import ImageArray
from .augment import BatchAugment, channel_stats, normalize, to_float
from .cache import cache_key, load_decoded
from .cifar import RestrictedUnpickler, load_pickle
from .decode import decode_images
from .files import IMAGE_EXTENSIONS, list_images
from .formats import available_formats, default_cache_dir, load_images, register_format
from .idx import FASHION_MNIST_CLASSES, load_fashion_mnist, read_idx
from .loader import BatchLoader, SizeOnlyBatches

__all__ = [
    "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS", "BatchAugment", "BatchLoader", "SizeOnlyBatches", "ImageArray",
    "RestrictedUnpickler", "available_formats", "cache_key", "channel_stats", "decode_images",
    "default_cache_dir", "list_images", "load_decoded", "load_fashion_mnist", "load_images",
    "load_pickle", "normalize", "read_idx", "register_format", "to_float",
]  # fmt: skip
