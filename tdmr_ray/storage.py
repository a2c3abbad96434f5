"""Storage URIs: a local path (default) or ``s3://bucket/prefix``, as a pyarrow filesystem.

S3 credentials come from the standard AWS environment/profile/instance profile. An S3-compatible
endpoint (MinIO, moto) is set with ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

DEFAULT_STORAGE = "~/tdmr_ray/storage"


def resolve_storage(uri: str | None) -> str:
    """The storage URI to use: the argument, ``$TDMR_STORAGE``, or ``~/tdmr_ray/storage``."""
    uri = uri or os.environ.get("TDMR_STORAGE") or DEFAULT_STORAGE
    if is_remote(uri):
        return uri
    if uri.startswith("file:"):  # file:///abs/path (what Path.as_uri() and Ray give): the path, never "./file:/..."
        uri = unquote(urlparse(uri).path)
    return str(Path(uri).expanduser().resolve())


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file:")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        kwargs.update(endpoint_override=host or endpoint, scheme=scheme or "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a storage URI."""
    uri = resolve_storage(uri)
    if uri.startswith("s3://"):
        return s3_filesystem(), uri.removeprefix("s3://").rstrip("/")
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def ray_storage_kwargs(storage: str, sub: str) -> dict:
    """``storage_path`` (and ``storage_filesystem`` for S3) for a Ray Train/Tune RunConfig."""
    storage = resolve_storage(storage)
    if is_remote(storage):
        fs, path = filesystem_for(storage)
        return {"storage_path": join(path, sub), "storage_filesystem": fs}
    return {"storage_path": join(storage, sub)}


class RunStore:
    """Files of one run under a storage URI (local or S3), written atomically: what a restarted
    actor on another node must find (fleet host checkpoints, the adapter's upload log)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem_for(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> str:
        return join(self.root, name)

    def write(self, name: str, data: bytes) -> None:
        path = self.path(name)
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        else:  # one PUT: the object appears whole or not at all
            with self.fs.open_output_stream(path) as out:
                out.write(data)

    def read(self, name: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(name)) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def list(self, prefix: str) -> list[str]:
        """Names (relative to the run) of the files in folder ``prefix``, sorted; hidden ones skipped."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(prefix), allow_not_found=True))
        return sorted(f"{prefix}/{i.base_name}" for i in infos
                      if i.type == pafs.FileType.File and not i.base_name.startswith("."))

    def delete(self, name: str) -> None:
        self.fs.delete_file(self.path(name))
