"""Hospital image data: manifests, format readers, standard transforms and demo-data preparation."""

from fedmq.site_agent.data.demo_data import dirichlet_partition, load_official_split, prepare_demo_data
from fedmq.site_agent.data.errors import (
    ChecksumMismatch,
    DataError,
    DatasetDownloadError,
    ImageReadError,
    ManifestError,
    UnsupportedImage,
    UnsupportedTransferSyntax,
)
from fedmq.site_agent.data.loaders import ImageCache, LoadedDataset, load_dataset
from fedmq.site_agent.data.manifest import Manifest, ManifestRow, read_manifest
from fedmq.site_agent.data.medmnist_source import KNOWN_MD5, MEDMNIST_URL, download_medmnist, locate_medmnist, md5_of
from fedmq.site_agent.data.transforms import DEFAULT_IMAGE_SIZE, LoadMedicalImaged, standard_transforms

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "KNOWN_MD5",
    "MEDMNIST_URL",
    "ChecksumMismatch",
    "DataError",
    "DatasetDownloadError",
    "ImageCache",
    "ImageReadError",
    "LoadMedicalImaged",
    "LoadedDataset",
    "Manifest",
    "ManifestError",
    "ManifestRow",
    "UnsupportedImage",
    "UnsupportedTransferSyntax",
    "dirichlet_partition",
    "download_medmnist",
    "load_dataset",
    "load_official_split",
    "locate_medmnist",
    "md5_of",
    "prepare_demo_data",
    "read_manifest",
    "standard_transforms",
]
