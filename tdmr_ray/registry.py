"""Versioned models and edge parameter sets on a local directory or any pyarrow filesystem (S3).

Layout: ``<root>/<name>/v000001/{tensors.safetensors, meta.json}``. ``meta.json`` is written last
and carries the tensors file's SHA-256, so a version exists for readers only once it is complete
(publish is atomic) and a corrupt or swapped file is detected. Tensors are safetensors: loading
never unpickles anything.

Kinds: ``model`` (a full model; ``format`` says how to rebuild it) and ``edge-params`` (a
normalization-affine parameter set applied on top of a ``base`` model version).

A version may carry other artefacts next to its tensors (``files``, e.g. ``model.onnx``: the
quantized model as a standard ONNX graph), each checksummed in ``meta.json`` like the tensors. A
reference ``name@vN:onnx`` loads a model from its ONNX artefact instead of its tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .storage import filesystem_for, join, resolve_storage

TENSORS, META, LATEST = "tensors.safetensors", "meta.json", "LATEST"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# format -> function(tensors, meta) -> nn.Module; other packages register theirs, imported on demand.
MODEL_LOADERS: dict[str, Callable] = {}
FORMAT_MODULES = {"tdmr-gdfq-quantized/1": "tdmr_ray.gdfq.registry_format"}


class RegistryError(ValueError):
    pass


@dataclass
class Version:
    name: str
    version: int
    meta: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"


ARTIFACT_FILES = {"onnx": "model.onnx"}  # ``name@vN:<artifact>`` -> the version's file to load
# artifact -> function(payload bytes, meta) -> nn.Module, registered like MODEL_LOADERS.
ARTIFACT_LOADERS: dict[str, Callable] = {}
ARTIFACT_MODULES = {"onnx": "tdmr_ray.gdfq.registry_format"}


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` or ``name@vN`` / ``name@N`` -> (name, version or None for latest); an artifact suffix
    (``:onnx``) is ignored here (see :func:`split_artifact`)."""
    name, _, ver = split_artifact(ref)[0].partition("@")
    try:
        return name, (int(ver.lstrip("v")) if ver else None)
    except ValueError:
        raise RegistryError(f"bad model reference {ref!r}: use name, name@vN or name@vN:onnx") from None


def split_artifact(ref: str) -> tuple[str, str | None]:
    """``name@vN:onnx`` -> (``name@vN``, ``"onnx"``); no suffix -> (ref, None)."""
    base, sep, artifact = ref.rpartition(":")
    if not sep:
        return ref, None
    if artifact not in ARTIFACT_FILES:
        raise RegistryError(f"bad model reference {ref!r}: unknown artifact {artifact!r} "
                            f"(known: {sorted(ARTIFACT_FILES)})")
    return base, artifact


def _load_normalized_model(tensors: dict, meta: dict):
    from .models import build_from_arch

    model = build_from_arch(meta["architecture"])
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RegistryError(f"{meta['name']}@v{meta['version']}: weights do not fit {meta['architecture']}: "
                            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()


MODEL_LOADERS["normalized-model"] = _load_normalized_model


class Registry:
    def __init__(self, uri: str | None = None):
        """``uri``: the registry's own root, a local path or ``s3://bucket/prefix``."""
        self.uri = uri or join(resolve_storage(None), "registry")
        self.fs, self.root = filesystem_for(self.uri)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)

    @classmethod
    def for_storage(cls, storage: str | None) -> "Registry":
        """The registry of a job's storage URI: ``<storage>/registry``."""
        return cls(join(resolve_storage(storage), "registry"))

    # -- writing ---------------------------------------------------------------------------
    def publish(self, name: str, tensors: dict[str, torch.Tensor], *, kind: str, format: str,
                architecture: dict | None = None, parent: str | None = None, metrics: dict | None = None,
                extra: dict | None = None, files: dict[str, bytes] | None = None) -> Version:
        """Store a new version of ``name``; returns it once readers can see it. ``files``: other
        artefacts of the version (file name -> bytes), checksummed in its metadata."""
        if not _NAME.match(name):
            raise RegistryError(f"bad registry name {name!r}: use letters, digits, '.', '_', '-'")
        files = files or {}
        for fname in files:
            if not _NAME.match(fname) or fname in (TENSORS, META):
                raise RegistryError(f"bad artefact file name {fname!r}")
        payload = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        version, vdir = self._claim_version(name)
        meta = {"name": name, "version": version, "kind": kind, "format": format,
                "architecture": architecture, "parent": parent, "metrics": metrics or {},
                "created": datetime.now(timezone.utc).isoformat(), "sha256": hashlib.sha256(payload).hexdigest(),
                "bytes": len(payload), **(extra or {})}
        if files:
            meta["files"] = {f: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for f, b in files.items()}
        for fname, data in files.items():
            self._write(join(vdir, fname), data)
        self._write(join(vdir, TENSORS), payload)
        self._write(join(vdir, META), json.dumps(meta, indent=1, default=str).encode())  # commit point
        try:  # a hint for pollers (see latest_version); the version exists whether or not it is written
            self._write(join(self.root, name, LATEST), str(version).encode())
        except OSError:
            pass
        return Version(name, version, meta)

    def publish_model(self, name: str, model, *, parent: str | None = None, metrics: dict | None = None,
                      format: str = "normalized-model", extra: dict | None = None) -> Version:
        return self.publish(name, model.state_dict(), kind="model", format=format,
                            architecture=getattr(model, "arch", None), parent=parent, metrics=metrics,
                            extra=extra)

    def publish_edge_params(self, name: str, params: dict[str, torch.Tensor], *, base: str,
                            parent: str | None = None, metrics: dict | None = None,
                            extra: dict | None = None) -> Version:
        """A normalization-affine parameter set for model version ``base`` (``name@vN``)."""
        return self.publish(name, params, kind="edge-params", format="norm-affine", parent=parent,
                            metrics=metrics, extra={"base": base, **(extra or {})})

    def _claim_version(self, name: str) -> tuple[int, str]:
        latest = self.latest_version(name, complete_only=False) or 0
        while True:
            latest += 1
            vdir = join(self.root, name, f"v{latest:06d}")
            if not self._local:  # object stores: one writer per name (documented)
                return latest, vdir
            Path(vdir).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(vdir)  # atomic claim among concurrent local writers
                return latest, vdir
            except FileExistsError:
                continue

    def _write(self, path: str, data: bytes) -> None:
        if self._local:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
        else:  # a single PUT: objects appear whole or not at all
            with self.fs.open_output_stream(path) as out:
                out.write(data)

    # -- reading ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        info = self._info(pafs.FileSelector(self.root, allow_not_found=True), self.root)
        return sorted(i.base_name for i in info if i.type == pafs.FileType.Directory and _NAME.match(i.base_name))

    def versions(self, name: str, complete_only: bool = True) -> list[int]:
        infos = self._info(pafs.FileSelector(join(self.root, name), allow_not_found=True), join(self.root, name))
        found = sorted(int(m.group(1)) for i in infos if (m := _VERSION_DIR.match(i.base_name)))
        if not complete_only:
            return found
        metas = self._info([join(self.root, name, f"v{v:06d}", META) for v in found], join(self.root, name))
        return [v for v, i in zip(found, metas) if i.type == pafs.FileType.File]

    def latest_version(self, name: str, complete_only: bool = True) -> int | None:
        """The newest complete version. A poll is one small read: the ``LATEST`` pointer that
        ``publish`` writes after the commit point, then a probe for newer complete versions (the
        pointer is only a hint: concurrent writers may leave it behind). Without a usable pointer
        (older registries, a corrupt one), the version directories are listed."""
        if complete_only:
            hinted = self._latest_hint(name)
            if hinted is not None:
                return hinted
        found = self.versions(name, complete_only)
        return found[-1] if found else None

    def _latest_hint(self, name: str) -> int | None:
        try:
            with self.fs.open_input_stream(join(self.root, name, LATEST)) as f:
                version = int(f.read().decode().strip())
        except (FileNotFoundError, OSError, ValueError, UnicodeDecodeError):
            return None
        if version < 1 or not self._complete(name, version):
            return None
        while self._complete(name, version + 1):
            version += 1
        return version

    def _complete(self, name: str, version: int) -> bool:
        path = join(self.root, name, f"v{version:06d}", META)
        info = self._info(path, path)
        return info.type == pafs.FileType.File

    def meta(self, name: str, version: int | None = None) -> dict:
        version = self._resolve(name, version)
        path = join(self.root, name, f"v{version:06d}", META)
        try:
            meta = json.loads(self._read(path))
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path}: corrupt metadata ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("version") != version or "sha256" not in meta:
            raise RegistryError(f"{path}: corrupt metadata (not a mapping with this version and a sha256)")
        return meta

    def load_tensors(self, name: str, version: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        meta = self.meta(name, version)
        path = join(self.root, name, f"v{meta['version']:06d}", TENSORS)
        payload = self._read(path)
        digest = hashlib.sha256(payload).hexdigest()
        if digest != meta.get("sha256"):
            raise RegistryError(f"{path}: checksum mismatch (file {digest[:12]}…, metadata "
                                f"{str(meta.get('sha256'))[:12]}…): the file is corrupt or was replaced")
        try:
            return st_load(payload), meta
        except Exception as exc:
            raise RegistryError(f"{path}: not a valid safetensors file ({exc})") from exc

    def load_file(self, name: str, version: int | None, fname: str) -> tuple[bytes, dict]:
        """An artefact stored next to a version's tensors, checked against its checksum."""
        meta = self.meta(name, version)
        record = (meta.get("files") or {}).get(fname)
        if record is None:
            raise RegistryError(f"{name}@v{meta['version']} has no {fname} (it has: "
                                f"{sorted(meta.get('files') or {}) or 'no artefacts'})")
        path = join(self.root, name, f"v{meta['version']:06d}", fname)
        payload = self._read(path)
        if hashlib.sha256(payload).hexdigest() != record["sha256"]:
            raise RegistryError(f"{path}: checksum mismatch: the file is corrupt or was replaced")
        return payload, meta

    def load_model(self, name: str, version: int | None = None, artifact: str | None = None):
        """The model of a version, rebuilt from its tensors or (``artifact="onnx"``) its ONNX file."""
        if artifact is not None:
            if artifact not in ARTIFACT_FILES:
                raise RegistryError(f"unknown artifact {artifact!r} (known: {sorted(ARTIFACT_FILES)})")
            payload, meta = self.load_file(name, version, ARTIFACT_FILES[artifact])
            if artifact not in ARTIFACT_LOADERS:
                import importlib

                importlib.import_module(ARTIFACT_MODULES[artifact])
            return ARTIFACT_LOADERS[artifact](payload, meta)
        tensors, meta = self.load_tensors(name, version)
        if meta.get("kind") != "model":
            raise RegistryError(f"{name}@v{meta['version']} is a {meta.get('kind')!r}, not a model")
        if meta.get("format") in FORMAT_MODULES and meta["format"] not in MODEL_LOADERS:
            import importlib

            importlib.import_module(FORMAT_MODULES[meta["format"]])
        loader = MODEL_LOADERS.get(meta.get("format"))
        if loader is None:
            raise RegistryError(f"{name}@v{meta['version']}: unknown model format {meta.get('format')!r} "
                                f"(known: {sorted(MODEL_LOADERS)})")
        return loader(tensors, meta)

    def load_ref(self, ref: str):
        """``name[@vN]`` -> model (for kind model) or (params, meta) for edge parameter sets."""
        name, version = parse_ref(ref)
        artifact = split_artifact(ref)[1]
        if artifact is not None or self.meta(name, version).get("kind") == "model":
            return self.load_model(name, version, artifact)
        return self.load_tensors(name, version)

    def _resolve(self, name: str, version: int | None) -> int:
        if version is None:
            version = self.latest_version(name)
            if version is None:
                raise RegistryError(f"no model or parameter set named {name!r} in registry {self.root} "
                                    f"(known: {self.names()[:20]})")
        return version

    def _info(self, what, where: str):
        """``fs.get_file_info(what)``; a storage failure (an unreachable S3 endpoint, denied access)
        is a RegistryError naming ``where``."""
        try:
            return self.fs.get_file_info(what)
        except OSError as exc:
            raise RegistryError(f"cannot list {where}: {exc}") from exc

    def _read(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except (FileNotFoundError, OSError) as exc:
            raise RegistryError(f"cannot read {path}: {exc}") from exc
