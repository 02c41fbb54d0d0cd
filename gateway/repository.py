"""The model repository on disk: `<root>/<endpoint>/<version>/` holding a model file and a manifest.

Artifacts are immutable. Each version's manifest records the sha256 of its model file; the
gateway hashes the file at load and refuses it when the digest differs from the manifest
(or from the digest an operator passed in).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.errors import ArtifactError, InvalidInput

MANIFEST = "manifest.yaml"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class Artifact:
    """A verified model file: where it is and the sha256 it was checked against."""

    endpoint: str
    version: str
    path: Path
    sha256: str
    description: str


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
    """Finds and verifies artifacts under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def version_dir(self, endpoint: str, version: str) -> Path:
        """The directory of one version."""
        return self.root / endpoint / version

    def resolve(self, endpoint: str, version: str, *, expected_sha256: str | None = None) -> Artifact:
        """Locate a version's model file and check its digest against the manifest and `expected_sha256`."""
        directory = self.version_dir(endpoint, version)
        if not directory.is_dir():
            raise ArtifactError(
                f"no directory for {endpoint} {version}: expected {directory} "
                f"under the model root {self.root}"
            )
        manifest = _read_manifest(directory)
        file_name = str(manifest.get("file", "model.onnx"))
        path = (directory / file_name).resolve()
        if not path.is_relative_to(self.root):
            raise ArtifactError(f"{directory / MANIFEST}: file {file_name!r} points outside the model root")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (named by {directory / MANIFEST})")
        recorded = manifest.get("sha256")
        if not isinstance(recorded, str) or not _SHA256.match(recorded.lower()):
            raise ArtifactError(f"{directory / MANIFEST}: 'sha256' must be 64 hex characters")
        recorded = recorded.lower()
        if expected_sha256 is not None and expected_sha256 != recorded:
            raise ArtifactError(
                f"{endpoint} {version}: the manifest records sha256 {recorded}, "
                f"but {expected_sha256} was expected; artifacts are immutable, publish a new version instead"
            )
        actual = file_sha256(path)
        if actual != recorded:
            raise ArtifactError(
                f"{path} has sha256 {actual}, but its manifest records {recorded}; "
                "the file changed after it was published (artifacts are immutable: publish a new version)"
            )
        return Artifact(endpoint, version, path, actual, str(manifest.get("description", "")))
