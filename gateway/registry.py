"""`ModelRegistry`: the loaded model versions, their lifecycle states and digests.

Versions of one endpoint live side by side. A version is warmed up before it becomes
READY, and only READY versions are handed to the data plane. The registry never picks
versions for requests (the router does) and never knows who listens to its changes:
listeners subscribe with `on_change`.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from gateway.errors import AlreadyExists, GatewayError, NotFound, NotReady
from gateway.repository import Artifact, ModelRepository
from gateway.runtime import OnnxModel
from gateway.tensors import TensorSpec

log = logging.getLogger(__name__)


class VersionState(enum.Enum):
    """Lifecycle of a loaded version."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A snapshot of one version: where it came from, its state and, once ready, its model."""

    endpoint: str
    version: str
    state: VersionState
    sha256: str = ""
    path: str = ""
    loaded_at: float = 0.0
    load_seconds: float = 0.0
    error: str = ""
    model: OnnxModel | None = None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Input signature (empty until loaded)."""
        return self.model.inputs if self.model else ()

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Output signature (empty until loaded)."""
        return self.model.outputs if self.model else ()


Listener = Callable[[ModelVersion], None]


class ModelRegistry:
    """Owns every loaded version and its state; the data plane reads ready models lock-free."""

    def __init__(self, repository: ModelRepository, *, clock: Callable[[], float] = time.time) -> None:
        self.repository = repository
        self._clock = clock
        self._versions: dict[tuple[str, str], ModelVersion] = {}
        # (endpoint, version) -> model, READY versions only: the data plane's one dict read.
        self._ready: dict[tuple[str, str], OnnxModel] = {}
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    def on_change(self, listener: Listener) -> None:
        """Call `listener` with the new snapshot whenever a version changes state."""
        self._listeners.append(listener)

    def _publish(self, snapshot: ModelVersion) -> None:
        with self._lock:
            key = (snapshot.endpoint, snapshot.version)
            self._versions[key] = snapshot
            if snapshot.state is VersionState.READY and snapshot.model is not None:
                self._ready[key] = snapshot.model
            else:
                self._ready.pop(key, None)
        for listener in self._listeners:
            listener(snapshot)

    def load(self, artifact: Artifact, *, intra_op_threads: int = 1, warm_up_batch: int = 1) -> ModelVersion:
        """Verify, load and warm a version; it becomes READY only after the warm-up succeeded.

        Blocking (file read and hash, session creation): call it off the event loop.
        """
        endpoint, version = artifact.endpoint, artifact.version
        key = (endpoint, version)
        with self._lock:
            current = self._versions.get(key)
            if current is not None and current.state in (VersionState.LOADING, VersionState.READY):
                raise AlreadyExists(f"{endpoint} {version} is already {current.state.value}")
        started = time.perf_counter()
        self._publish(ModelVersion(endpoint, version, VersionState.LOADING, sha256=artifact.sha256, path=artifact.path))
        try:
            model = self.repository.load_verified(
                artifact, lambda path: OnnxModel(path, source=artifact.path, intra_op_threads=intra_op_threads)
            )
            model.warm_up(batch_size=warm_up_batch)
            model.measure_cost()
        except GatewayError as err:
            self._publish(self._failed(artifact, err.message))
            raise
        except Exception as err:
            log.exception("loading %s %s failed", endpoint, version)
            self._publish(self._failed(artifact, str(err)))
            raise
        snapshot = ModelVersion(
            endpoint,
            version,
            VersionState.READY,
            sha256=artifact.sha256,
            path=artifact.path,
            loaded_at=self._clock(),
            load_seconds=time.perf_counter() - started,
            model=model,
        )
        self._publish(snapshot)
        log.info(
            "loaded %s %s sha256=%s in %.3fs (measured: %s)",
            endpoint,
            version,
            artifact.sha256,
            snapshot.load_seconds,
            model.cost.describe(),
        )
        return snapshot

    @staticmethod
    def _failed(artifact: Artifact, error: str) -> ModelVersion:
        return ModelVersion(
            artifact.endpoint,
            artifact.version,
            VersionState.FAILED,
            sha256=artifact.sha256,
            path=artifact.path,
            error=error,
        )

    def unload(self, endpoint: str, version: str) -> ModelVersion:
        """Forget a version; the caller (control plane) checks it takes no traffic first.

        Requests already running keep their reference to the model and finish normally.
        """
        snapshot = self.get(endpoint, version)
        self._publish(replace(snapshot, state=VersionState.DRAINING, model=None))
        with self._lock:
            self._versions.pop((endpoint, version), None)
            self._ready.pop((endpoint, version), None)
        return snapshot

    def get(self, endpoint: str, version: str) -> ModelVersion:
        """The snapshot of one version, or NotFound listing the endpoint's versions."""
        snapshot = self._versions.get((endpoint, version))
        if snapshot is None:
            known = self.versions_of(endpoint)
            if not known:
                raise NotFound(f"no versions are loaded for endpoint {endpoint!r}")
            loaded = ", ".join(v.version for v in known)
            raise NotFound(f"{endpoint} has no version {version!r}; loaded versions: {loaded}")
        return snapshot

    def versions_of(self, endpoint: str) -> list[ModelVersion]:
        """Every version of an endpoint, in load order."""
        return [v for (e, _), v in list(self._versions.items()) if e == endpoint]

    def is_ready(self, endpoint: str, version: str) -> bool:
        """Whether a version can serve now."""
        return (endpoint, version) in self._ready

    def ready_model(self, endpoint: str, version: str) -> OnnxModel | None:
        """The READY model of a version, or None."""
        return self._ready.get((endpoint, version))

    def runnable(self, endpoint: str, version: str) -> OnnxModel:
        """The READY model of a version (hot path: one dict read), or NotReady naming its state."""
        model = self._ready.get((endpoint, version))
        if model is not None:
            return model
        snapshot = self.get(endpoint, version)
        detail = f": {snapshot.error}" if snapshot.error else ""
        raise NotReady(f"{endpoint} {version} is {snapshot.state.value}, not ready{detail}")
