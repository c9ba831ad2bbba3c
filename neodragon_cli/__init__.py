"""neodragon: make Pyramid-Flow-class text-to-video transformers mobile-ready, and generate videos."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neodragon")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"


def load_component(kind: str, path, **kwargs):
    """Load a registered component (e.g. kind="mmdit" or "mmdit/pyramid-flow") from a local folder/file."""
    from neodragon_cli.registry import load_component as _load

    return _load(kind, path, **kwargs)


__all__ = ["__version__", "load_component"]
