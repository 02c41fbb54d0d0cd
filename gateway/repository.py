"""The model repository on disk: every artifact lives under one root directory.

The conventional layout is `<root>/<endpoint>/<version>/` holding `model.onnx` and a
`manifest.yaml` that records the file's sha256. Artifacts are immutable: the gateway refuses
a file when its digest differs from the one on record (the manifest's, or the one an
operator passed to LoadVersion), or when it changed between hashing and loading.

Files are never read whole into Python memory: a file over the size limit is refused from
its size alone, the digest is computed in 1 MiB chunks, and the runtime loads the file by path.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from gateway.errors import ArtifactError, InvalidInput, TooLarge

MANIFEST = "manifest.yaml"
DEFAULT_FILE = "model.onnx"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: Largest model file loaded unless configured otherwise (`max_model_bytes`).
DEFAULT_MAX_MODEL_BYTES = 2 << 30
_CHUNK = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Artifact:
    """A reference to one model file: its path relative to the model root and its recorded sha256."""

    endpoint: str
    version: str
    path: str
    sha256: str


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(value: str, *, field: str = "sha256") -> str:
    """A lower-case hex sha256, or InvalidInput naming the field."""
    normalized = value.strip().lower()
    if not _SHA256.match(normalized):
        raise InvalidInput(f"{field} must be 64 hex characters (a sha256), got {value!r}", field=field)
    return normalized


def _read_manifest(directory: Path) -> dict[str, object]:
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path} is missing; every version needs a manifest with its sha256")
    try:
        loaded = yaml.safe_load(manifest_path.read_text())
    except yaml.YAMLError as err:
        raise ArtifactError(f"{manifest_path} is not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ArtifactError(f"{manifest_path} must be a mapping with at least 'sha256'")
    return loaded


class ModelRepository:
    """Finds artifacts under one root and reads them with their digest checked."""

    def __init__(self, root: Path, *, max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> None:
        self.root = root.resolve()
        self.max_model_bytes = max_model_bytes

    def _inside(self, path: Path, *, what: str) -> Path:
        resolved = (path if path.is_absolute() else self.root / path).resolve()
        if not resolved.is_relative_to(self.root):
            raise ArtifactError(f"{what} {path} is outside the model root {self.root}")
        return resolved

    def has_manifest(self, endpoint: str, version: str) -> bool:
        """Whether `<root>/<endpoint>/<version>/` has a manifest (versions loaded by path may not)."""
        return (self.root / endpoint / version / MANIFEST).is_file()

    def from_manifest(self, endpoint: str, version: str) -> Artifact:
        """The artifact `<root>/<endpoint>/<version>/` describes in its manifest."""
        directory = self.root / endpoint / version
        if not directory.is_dir():
            raise ArtifactError(
                f"no directory for {endpoint} {version}: expected {directory} under the model root {self.root}"
            )
        manifest = _read_manifest(directory)
        path = self._inside(directory / str(manifest.get("file", DEFAULT_FILE)), what=f"{directory / MANIFEST}: file")
        recorded = manifest.get("sha256")
        if not isinstance(recorded, str) or not _SHA256.match(recorded.lower()):
            raise ArtifactError(f"{directory / MANIFEST}: 'sha256' must be 64 hex characters")
        return Artifact(endpoint, version, str(path.relative_to(self.root)), recorded.lower())

    def at_path(self, endpoint: str, version: str, path: str, sha256: str) -> Artifact:
        """An operator-named artifact: a model file (or a version directory with a manifest) under the root.

        The operator's sha256 must match the manifest's when there is one.
        """
        expected = check_sha256(sha256)
        resolved = self._inside(Path(path), what="path")
        if resolved.is_dir():
            manifest = _read_manifest(resolved)
            recorded = str(manifest.get("sha256", "")).lower()
            if recorded != expected:
                raise ArtifactError(
                    f"{resolved / MANIFEST} records sha256 {recorded or '(none)'}, "
                    f"but {expected} was expected; "
                    "artifacts are immutable, publish a new version instead"
                )
            resolved = self._inside(resolved / str(manifest.get("file", DEFAULT_FILE)), what="file")
        if not resolved.is_file():
            raise ArtifactError(f"{resolved} does not exist (looked under the model root {self.root})")
        return Artifact(endpoint, version, str(resolved.relative_to(self.root)), expected)

    def read_verified(self, artifact: Artifact) -> bytes:
        """The artifact's bytes, after checking they hash to its recorded sha256 (small files, tests)."""
        return self.load_verified(artifact, Path.read_bytes)

    def load_verified(self, artifact: Artifact, load: Callable[[Path], T]) -> T:
        """`load(path)` of the artifact's file, after checking its size and digest; refused if it changed meanwhile.

        The size is checked before a byte is read; the digest is computed in chunks; the file's
        identity (device, inode, size, modification time) must be the same after `load` as when
        it was hashed, so what was loaded is what was verified.
        """
        path = self._inside(Path(artifact.path), what="path")
        before = self._stat(path)
        self._check_digest(path, artifact, before.st_size)
        loaded = load(path)
        after = self._stat(path)
        if _identity(after) != _identity(before):
            raise ArtifactError(
                f"{path} changed while it was being loaded; artifacts are immutable (publish a new version)"
            )
        return loaded

    def verify(self, artifact: Artifact) -> None:
        """Check the artifact's size and digest without loading it (a dry run)."""
        self.load_verified(artifact, lambda _path: None)

    def _stat(self, path: Path) -> os.stat_result:
        try:
            stat = path.stat()
        except OSError as err:
            raise ArtifactError(f"cannot read {path}: {err.strerror}") from None
        if stat.st_size > self.max_model_bytes:
            raise TooLarge(
                f"{path} is {stat.st_size} bytes; model files may be at most {self.max_model_bytes} bytes "
                "(setting max_model_bytes)"
            )
        return stat

    def _check_digest(self, path: Path, artifact: Artifact, size: int) -> None:
        digest = hashlib.sha256()
        read = 0
        try:
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    read += len(chunk)
                    if read > max(size, self.max_model_bytes):
                        raise ArtifactError(f"{path} grew while it was being hashed; artifacts are immutable")
                    digest.update(chunk)
        except OSError as err:
            raise ArtifactError(f"cannot read {path}: {err.strerror}") from None
        actual = digest.hexdigest()
        if actual != artifact.sha256:
            raise ArtifactError(
                f"{path} has sha256 {actual}, but {artifact.endpoint} {artifact.version} was registered with "
                f"{artifact.sha256}; the file changed after it was published "
                "(artifacts are immutable: publish a new version)"
            )


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns
