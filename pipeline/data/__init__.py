"""Input side of kdpipe: records from COCO-style directories or WebDataset tars, the shapes
world generator, and the stored-image / view machinery.

``open_source(spec)`` returns a ``Source`` whose splits are lists of ``Unit``s of ``Record``s.
"""

from . import coco, wds_input  # noqa: F401  (register the source kinds)
from .records import DATASETS, Record, Source, Unit, open_source
from .shapes import SHAPES, make_shapes
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
