"""`Gateway`: assembles the transport-free core from a route file and owns its lifecycle."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.config import GatewayConfig, build_route_table, load_config
from gateway.inference import InferenceService
from gateway.registry import ModelRegistry, ModelVersion
from gateway.repository import ModelRepository
from gateway.routing import Router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """Transport limits shared by every listener."""

    max_message_bytes: int = 4 * 1024 * 1024


class Gateway:
    """The domain core of one gateway process: registry, router and inference service."""

    def __init__(self, config: GatewayConfig, *, limits: ServerLimits | None = None) -> None:
        self.config = config
        self.limits = limits or ServerLimits()
        self.registry = ModelRegistry(ModelRepository(config.model_root))
        self.router = Router(build_route_table(config, revision=1))
        self.inference = InferenceService(self.registry, self.router)

    @classmethod
    def from_file(cls, path: Path, *, limits: ServerLimits | None = None) -> Gateway:
        """Build from a route file (validated; raises ConfigError naming the field)."""
        return cls(load_config(path), limits=limits)

    def load_models(self, progress: Callable[[ModelVersion], None] | None = None) -> None:
        """Load, verify and warm every configured version. Blocking; any failure stops the start."""
        for name, endpoint in self.config.endpoints.items():
            for version in endpoint.versions:
                loaded = self.registry.load(
                    name,
                    version,
                    intra_op_threads=endpoint.intra_op_threads,
                )
                if progress:
                    progress(loaded)
