"""neodragon: make Pyramid-Flow-class text-to-video transformers mobile-ready, and generate videos."""

# The one place the version is written: pyproject.toml reads it (`[tool.setuptools.dynamic]`), so
# `neodragon --version` needs no package-metadata lookup at start-up.
__version__ = "0.1.0"


def load_component(kind: str, path, **kwargs):
    """Load a registered component (e.g. kind="mmdit" or "mmdit/pyramid-flow") from a local folder/file."""
    from neodragon_cli.registry import load_component as _load

    return _load(kind, path, **kwargs)


__all__ = ["__version__", "load_component"]
