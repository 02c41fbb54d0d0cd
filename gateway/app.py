"""`Gateway`: assembles the transport-free core and owns its lifecycle."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from gateway.admission import Admission
from gateway.auth import FleetKey
from gateway.config import GatewayConfig, ShadowCompareConfig
from gateway.control import ControlPlane
from gateway.desired import DesiredState, desired_from_config, load_route_file
from gateway.faults import FaultInjector
from gateway.feedback import FeedbackJoin
from gateway.follower import StoreFollower
from gateway.inference import InferenceService
from gateway.orchestration.fleet import Fleet, load_fleet_key
from gateway.orchestration.fleet_windows import FleetWindows, GuardianLeadership, Puller
from gateway.orchestration.guardian import Guardian
from gateway.orchestration.incidents import IncidentLog
from gateway.orchestration.rollout import RolloutDriver
from gateway.registry import ModelRegistry, ModelVersion, VersionState
from gateway.repository import ModelRepository
from gateway.routing import Router, RouteTable
from gateway.runner import ModelRunner, RunnerSettings, default_threads
from gateway.settings import GatewaySettings
from gateway.shadow.runner import ShadowRunner
from gateway.state import StateStore
from gateway.telemetry.drift import DriftBins, load_reference
from gateway.telemetry.metrics import Telemetry
from gateway.telemetry.windows import WindowStore

log = logging.getLogger(__name__)


class Gateway:
    """The domain core of one gateway process: registry, router, inference service and control plane.

    The route file seeds an empty store; after that the store is the truth, and changes go
    through the control plane (admin RPCs, `Apply` for a whole file).
    """

    def __init__(
        self,
        config: GatewayConfig,
        store: StateStore,
        *,
        settings: GatewaySettings | None = None,
        config_source: str = "route file",
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.config_source = config_source
        self.store = store
        self.settings = settings or GatewaySettings.plain()
        self._owns_telemetry = telemetry is None
        self.telemetry = telemetry or Telemetry(WindowStore(self.settings.window_history, clock=clock))
        self.repository = ModelRepository(config.model_root, max_model_bytes=self.settings.max_model_bytes)
        self.registry = ModelRegistry(self.repository, clock=clock)
        self.router = Router(RouteTable(0, {}))
        self.faults = FaultInjector()
        self.shadow = ShadowRunner(
            self.registry, self.telemetry, self.faults, self.settings.shadow, compare=self._compare_settings
        )
        self.control = ControlPlane(store, self.registry, self.router, history_seconds=self.telemetry.windows.horizon)
        self.follower = StoreFollower(self.control)
        self.feedback = FeedbackJoin(self.telemetry.windows, clock=clock, counted=self.telemetry.feedback_counted)
        self.rollouts = RolloutDriver(self.control, clock=clock, history_seconds=self.telemetry.windows.horizon)
        self.incidents = IncidentLog(store)
        self.guardian = Guardian(
            self.control,
            self.telemetry.windows,
            self.registry,
            self.rollouts,
            self.incidents,
            clock=clock,
            tick_seconds=self.settings.guardian_tick,
            drift=self.telemetry.drift,
            memory=self.telemetry.memory,
            gauges=self.telemetry.gauges,
        )
        self.fleet = Fleet(store, lease_seconds=self.settings.fleet_lease)
        self.fleet_windows = FleetWindows(self.telemetry.windows, self.fleet.member_id, drift=self.telemetry.drift)
        #: The secret the fleet's processes share (read from the store by `start`).
        self.fleet_key: FleetKey | None = None
        self.runner = ModelRunner(
            RunnerSettings(
                # Each worker process gets its share of the cores.
                threads=self.settings.runner_threads or max(1, default_threads() // self.settings.workers),
                inline_max_seconds=self.settings.inline_run_max_us / 1e6,
            )
        )
        admission = Admission(self.settings.max_concurrent_per_version, self.settings.default_deadline)
        self.inference = InferenceService(
            self.registry,
            self.router,
            self.telemetry,
            shadow=self.shadow,
            faults=self.faults,
            feedback=self.feedback,
            admission=admission,
            runner=self.runner,
        )
        self.telemetry.in_flight = admission.snapshot
        self._observe()

    def _observe(self) -> None:
        """Feed lifecycle events to telemetry: loads, route revisions, admin changes."""
        telemetry = self.telemetry

        def loaded(snapshot: ModelVersion) -> None:
            if snapshot.state is VersionState.READY:
                telemetry.model_loaded(snapshot.endpoint, snapshot.version, snapshot.load_seconds)
                if snapshot.model is not None:
                    log.info("%s", self.runner.describe(snapshot.endpoint, snapshot.version, snapshot.model))

        def routed(revision: int, state: DesiredState) -> None:
            table = self.router.table
            telemetry.routes_changed(
                revision,
                [
                    (name, version, table.endpoint(name).arm_of(version), endpoint.weights.get(version, 0))
                    for name, endpoint in state.endpoints.items()
                    for version in endpoint.versions
                ],
            )

        unbatched: set[tuple[str, str]] = set()

        def batching_notes(_revision: int, state: DesiredState) -> None:
            # Batching configured for a model that cannot merge runs is a no-op: say so once.
            for name, endpoint in state.endpoints.items():
                for version in endpoint.versions if endpoint.batching is not None else ():
                    model = self.registry.ready_model(name, version)
                    if model is not None and not model.batchable and (name, version) not in unbatched:
                        unbatched.add((name, version))
                        log.warning(
                            "%s %s: batching is configured but this model cannot merge requests (an input or "
                            "output has no free first dimension, or it fails at 32 rows): each request runs alone",
                            name,
                            version,
                        )

        def faults(_revision: int, state: DesiredState) -> None:
            self.faults.replace(
                {(name, version): fault for name, ep in state.endpoints.items() for version, fault in ep.faults.items()}
            )

        self.control.health.on_change(lambda status: telemetry.store_changed(status.connected))

        references: dict[str, str] = {}

        def drift_references(_revision: int, state: DesiredState) -> None:
            wanted = {name: ep.drift_reference for name, ep in state.endpoints.items() if ep.drift_reference}
            if wanted != references:
                references.clear()
                references.update(wanted)
                telemetry.drift.set_references(
                    {name: self._drift_reference(name, path) for name, path in wanted.items()}
                )

        self.registry.on_change(loaded)
        self.control.on_change(routed)
        self.control.on_change(batching_notes)
        self.control.on_change(drift_references)
        self.control.on_change(faults)
        self.control.on_commit(
            lambda intent, _revision: telemetry.admin_change(intent.endpoint, intent.action, intent.trigger)
        )

    @classmethod
    def from_file(
        cls,
        path: Path,
        store: StateStore,
        *,
        settings: GatewaySettings | None = None,
        telemetry: Telemetry | None = None,
    ) -> Gateway:
        """Build from a route file (validated; raises ConfigError naming the field)."""
        return cls(load_route_file(path), store, settings=settings, config_source=str(path), telemetry=telemetry)

    def start(self) -> int:
        """Start telemetry export, shadow workers and runner pool; restore (or seed) the routes; load versions.

        Blocking; returns the revision. A failed start stops what it started. The guardian is
        started apart (`guardian.start()`): tests and drills tick it themselves.
        """
        try:
            self.telemetry.start()
            self.shadow.start()
            self.runner.start()
            revision = self.control.start(
                lambda: desired_from_config(self.config, self.repository), seed_source=self.config_source
            )
            self.fleet_key = load_fleet_key(self.store)
            self.feedback.sign_with(self.fleet_key.derive("feedback-ids"))
        except BaseException:
            self.runner.shutdown()
            self.shadow.shutdown()
            if self._owns_telemetry:
                self.telemetry.shutdown()
            raise
        return revision.revision

    def _drift_reference(self, endpoint: str, path: str) -> DriftBins | str:
        """An endpoint's drift bins from its reference file, or what is wrong with the file."""
        file = (self.repository.root / path).resolve()
        try:
            if not file.is_relative_to(self.repository.root):
                raise ValueError(f"drift reference {path} is outside the model root {self.repository.root}")
            return load_reference(file)
        except ValueError as err:
            log.error("%s: %s; its drift rules stay inconclusive", endpoint, err)
            return str(err)

    def join_fleet(self, address: str, puller: Puller) -> None:
        """Join the processes sharing the store (reachable at `address`); the guardian then acts only while leading.

        Blocking (store I/O). `puller` asks the other members for their window counts.
        """
        self.fleet_windows.puller = puller
        self.fleet.start(address)
        self.guardian.lead(GuardianLeadership(self.fleet, self.fleet_windows))

    def _compare_settings(self, endpoint: str) -> ShadowCompareConfig:
        state = self.control.state.endpoints.get(endpoint)
        return state.compare if state else ShadowCompareConfig()

    def close(self) -> None:
        """Stop following the store, the guardian, shadow and runner threads; release the store (and telemetry)."""
        self.follower.stop()
        self.guardian.stop()
        self.fleet.stop()
        self.shadow.shutdown()
        self.runner.shutdown()
        self.store.close()
        if self._owns_telemetry:
            self.telemetry.shutdown()
