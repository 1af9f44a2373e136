"""Export finished datasets in the formats the field reads.

Every export reads ``datasets/<category>/dataset/`` (what the cascade decided, one row per pool
image, in pool order, in committed parts read one after another; an older root's one ``dataset.parquet``
too) beside ``pool/images.parquet``, in fixed-size batches: memory stays bounded by the batch size
whatever the pool size. Labels people gave in a review (``import_review``) override the
cascade's decision for the images they reviewed.

- ``export_lsun``: LSUN's release format, one LMDB per category (``<name>_train_lmdb``, and
  ``<name>_val_lmdb`` with ``val_fraction``): key the image id, value a JPEG (quality 75) resized so its
  shorter side is 256. Read by ``torchvision.datasets.LSUN`` (which accepts only LSUN's ten scene names)
  or, for any name, ``torchvision.datasets.lsun.LSUNClass``.
- ``export_parquet``: the final manifest with labels, scores and provenance (optionally the image bytes),
  hive-partitioned by category (``<out>/category=<c>/part-0.parquet``).
- ``export_imagefolder``: ``positive/`` and ``negative/`` folders per category for
  ``torchvision.datasets.ImageFolder``; with ``combined=True`` one folder per category holding the
  images resolved to that class by ``resolve_classes`` (conflicts listed in ``conflicts.csv``).
- ``export_label_studio``: Label Studio tasks (JSON) with the model's score as a prediction, and the
  labeling config they need; ``import_review`` stores Label Studio's annotation export back as labels.

An image several category flows decided positive is exported once per category it belongs to. Image files
are checked against their content id before export; one that changed or vanished since ingest is left
out and listed (``ExportReport.skipped``, ``skipped.csv``). Folder and LMDB exports are built beside their
destination and moved into place when complete; Parquet and JSON are written atomically through the
storage root's rules, to any fsspec URL.

Modules: ``dataset`` (reading the finished dataset, reviews applied), ``encoding`` (fetching and
encoding images), ``staging`` (destinations and the run every export shares), ``report``, one module per
format (``lsun``, ``parquet``, ``imagefolder``, ``label_studio``) and ``review`` (importing reviews).
"""

from .dataset import REVIEW, SPLITS, dataset_batches, dataset_files, review_labels
from .encoding import FOLDER_EXT, fetch, folder_file, lsun_jpeg, resize_short_side
from .imagefolder import RULES, export_imagefolder, resolve_classes
from .label_studio import LABEL_STUDIO_CONFIG, export_label_studio
from .lsun import export_lsun, in_val
from .parquet import export_parquet
from .report import ExportError, ExportReport
from .review import ReviewReport, import_review

FORMATS: tuple[str, ...] = ("lsun", "parquet", "imagefolder", "label-studio")  # lsun-hitl export --format

__all__ = [
    "FOLDER_EXT",
    "FORMATS",
    "LABEL_STUDIO_CONFIG",
    "REVIEW",
    "RULES",
    "SPLITS",
    "ExportError",
    "ExportReport",
    "ReviewReport",
    "dataset_batches",
    "dataset_files",
    "export_imagefolder",
    "export_label_studio",
    "export_lsun",
    "export_parquet",
    "fetch",
    "folder_file",
    "import_review",
    "in_val",
    "lsun_jpeg",
    "resize_short_side",
    "resolve_classes",
    "review_labels",
]
