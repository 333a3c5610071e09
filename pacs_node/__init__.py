"""pacs-node: a DICOM AI node that sits beside a hospital PACS."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pacs-node")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__"]
