"""Storage: the registry of datasets and models, atomic writes, Parquet schemas and manifests."""

from storage.registry import ModelKind, Registry, RegistryError, Version, default_root, parse_ref

__all__ = ["ModelKind", "Registry", "RegistryError", "Version", "default_root", "parse_ref"]
