"""The model repository on disk: every artifact lives under one root directory.

The conventional layout is `<root>/<endpoint>/<version>/` holding `model.onnx` and a
`manifest.yaml` that records the file's sha256. Artifacts are immutable: the gateway reads a
file once, hashes exactly the bytes it loads, and refuses them when the digest differs from
the one on record (the manifest's, or the one an operator passed to LoadVersion).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.errors import ArtifactError, InvalidInput

MANIFEST = "manifest.yaml"
DEFAULT_FILE = "model.onnx"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

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
        """The artifact's bytes, after checking they hash to its recorded sha256."""
        path = self._inside(Path(artifact.path), what="path")
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ArtifactError(f"cannot read {path}: {err.strerror}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != artifact.sha256:
            raise ArtifactError(
                f"{path} has sha256 {actual}, but {artifact.endpoint} {artifact.version} was registered with "
                f"{artifact.sha256}; the file changed after it was published "
                "(artifacts are immutable: publish a new version)"
            )
        return data
