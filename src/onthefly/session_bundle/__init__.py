"""Session bundles: export a session folder as a checked folder or archive, and import one back.

A bundle holds what is needed to inspect or resume a session elsewhere: `session.json`, every
run's `run.json` and checkpoints, a consistent copy of `events.db`, and `manifest.json`, which
records the lineage and the sha256 of every file and of the manifest itself. Nothing in a bundle is
trusted before `verify_bundle` has checked every path and every byte, and importing never
overwrites existing data. See docs/bundles.md."""

from __future__ import annotations

from .export import export_session
from .format import BUNDLE_SCHEMA, BUNDLE_VERSION, BundleError, BundleInfo, encode_manifest, is_bundle
from .importing import import_session, latest_checkpoint
from .verify import verify_bundle

__all__ = [
    "BUNDLE_SCHEMA",
    "BUNDLE_VERSION",
    "BundleError",
    "BundleInfo",
    "encode_manifest",
    "export_session",
    "import_session",
    "is_bundle",
    "latest_checkpoint",
    "verify_bundle",
]
