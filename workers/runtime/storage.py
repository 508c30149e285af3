"""Where Ray Train and Ray Tune keep their runs: one storage URI for every pipeline (``--storage``).

Default: ``CALIBRAY_STORAGE`` if set, else the local folder ``artifacts/ray_results`` at the
repository root. On a multi-node cluster it must be storage every node reaches (a shared mount
or ``s3://`` / ``gs://``): Ray Train's workers write their checkpoints there and a resumed run
reads them from wherever its driver runs, and a repository-local folder is a different folder on
each node.
"""

from __future__ import annotations

import os
from pathlib import Path

from workers.runtime.tracking import ARTIFACTS

DEFAULT = ARTIFACTS / "ray_results"
ENV = "CALIBRAY_STORAGE"
HELP = f"Ray Train / Tune storage: a folder or a URI (s3://, gs://) every node reaches (default ${ENV} or {DEFAULT})"


def storage_uri(given: str | None = None) -> str:
    """A URI or an absolute local path, as Ray's ``RunConfig(storage_path=...)`` takes it."""
    value = (given or os.environ.get(ENV, "")).strip() or str(DEFAULT)
    if "://" in value:
        return value.rstrip("/")
    return str(Path(value).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """``uri/part/...`` for a URI or a local path (pathlib would turn ``s3://`` into ``s3:/``)."""
    return "/".join([uri.rstrip("/"), *parts])


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) of a storage URI or local path."""
    import pyarrow.fs

    if "://" not in uri:
        return pyarrow.fs.LocalFileSystem(), uri
    return pyarrow.fs.FileSystem.from_uri(uri)
