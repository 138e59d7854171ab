"""Input side of kdpipe: records from COCO-style directories, Flickr30k/8k with Karpathy's split
file, CSV/TSV files, WebDataset tars, Parquet files or saved Hugging Face datasets, labelled image
folders and CIFAR-10/100 python batches (``labelled``: class names and captions of labelled sets), the shapes
world generator, and the stored-image / view machinery.

``open_source(spec)`` returns a ``Source`` whose splits are lists of ``Unit``s of ``Record``s.

Modules, imports pointing down the list: ``sources`` (the ``DATASETS`` registry, ``open_source``)
> ``coco`` | ``flickr`` | ``csv_input`` | ``wds_input`` | ``parquet_input`` | ``hf_disk`` | ``imagefolder``
| ``cifar`` (the source kinds) and ``heldout`` (a val split for train-only input) > ``karpathy`` (split files, shared by coco
and flickr), ``tables`` (Arrow table columns to records, for parquet and hf) and ``labelled`` (class
names and captions, for imagefolder, cifar and kdpipe.zeroshot's folders) > ``records`` (record
types, the missing-image report, ``ErrorCounter``: the leaf); ``shapes`` (the synthetic world) and
``views`` (stored images, replayable views) stand alone. The cache's shards are read back by
``kdpipe.cachereader``, not here.
"""

from .records import Record, Source, Unit
from .shapes import SHAPES, make_shapes
from .sources import DATASETS, open_source
from .views import BadImage, View, apply_view, center_view, decode_image, sample_views, store_image, to_tensor

__all__ = [
    "DATASETS",
    "SHAPES",
    "BadImage",
    "Record",
    "Source",
    "Unit",
    "View",
    "apply_view",
    "center_view",
    "decode_image",
    "make_shapes",
    "open_source",
    "sample_views",
    "store_image",
    "to_tensor",
]
