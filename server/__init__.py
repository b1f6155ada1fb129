"""shadowserve: serve the legacy model, shadow the migrated one, compare them in Prometheus."""
__version__ = "0.1.0"


def build_version() -> str:
    """The installed shadowserve version ("unknown" when run from a tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shadowserve")
    except PackageNotFoundError:
        return "unknown"
