"""shadowserve: serve the legacy model, shadow the migrated one, compare them in Prometheus."""
__version__ = "0.1.0"
