"""Datasets, WebDataset shards and loaders (installed as ``clusterformer.data``).

Depends on nothing in ``clusterformer`` but ``ops``.
"""

from clusterformer.data.categories import id_to_train_id, to_dataset_ids, train_id_to_id
from clusterformer.data.errors import DatasetError, ImageDecodeError, SampleError
from clusterformer.data.formats import open_source
from clusterformer.data.images import decode_image, decode_image_array
from clusterformer.data.loader import build_loader, load_dataset_info
from clusterformer.data.loader_spec import LoaderSpec
from clusterformer.data.records import Record, decode_record, encode_record
from clusterformer.data.sample_spec import SampleSpec, register_sample_spec, sample_spec
from clusterformer.data.shapes import make_shapes
from clusterformer.data.shards import write_shards
from clusterformer.data.source import Source

__all__ = [
    "DatasetError",
    "ImageDecodeError",
    "LoaderSpec",
    "Record",
    "SampleError",
    "SampleSpec",
    "Source",
    "build_loader",
    "decode_image",
    "decode_image_array",
    "decode_record",
    "encode_record",
    "id_to_train_id",
    "load_dataset_info",
    "make_shapes",
    "open_source",
    "register_sample_spec",
    "sample_spec",
    "to_dataset_ids",
    "train_id_to_id",
    "write_shards",
]
