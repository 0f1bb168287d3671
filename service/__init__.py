"""whaleid: photo-ID identification of whales and dolphins behind a REST API."""

__version__ = "0.1.0"
