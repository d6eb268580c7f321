"""The Flower ServerApp: runs curriculum stages against the connected sites.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml, or ``--run-config``):

- ``curriculum``: path of the curriculum YAML; empty means the default curriculum;
- ``registry``: the registry folder;
- ``stages``: comma-separated stage names to run in this Flower run; empty means
  every stage not yet in the registry, in curriculum order;
- ``run-id``: a label written to the registry's run log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.curriculum import Curriculum, load_curriculum
from server.federation import FederationOptions, StageFailed, run_stage
from server.registry import Registry, VersionInfo
from unicon_model.log import ensure_logging, get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """Settings of one Flower run of the ServerApp."""

    curriculum: Path | None
    registry: Path
    stages: tuple[str, ...] = ()
    run_id: str = "local"
    node_wait_s: float = 120.0

    @classmethod
    def from_run_config(cls, run_config: dict) -> ServerSettings:
        """Read the settings from a Flower run config."""
        curriculum = str(run_config.get("curriculum", "") or "")
        stages = str(run_config.get("stages", "") or "")
        return cls(
            curriculum=Path(curriculum) if curriculum else None,
            registry=Path(str(run_config.get("registry", "runs/flwr/registry"))),
            stages=tuple(s.strip() for s in stages.split(",") if s.strip()),
            run_id=str(run_config.get("run-id", "flwr")),
            node_wait_s=float(run_config.get("node-wait-s", 120.0)),
        )


def stages_to_run(
    curriculum: Curriculum, registry: Registry, requested: tuple[str, ...]
) -> list[str]:
    """Return the stages of this run, in curriculum order."""
    if requested:
        for name in requested:
            curriculum.stage(name)  # raises with the known names
        return [s.name for s in curriculum.stages if s.name in requested]
    done = {v.stage for v in registry.versions()}
    return [s.name for s in curriculum.stages if s.name not in done]


def run_federation(grid: Grid, settings: ServerSettings) -> list[VersionInfo]:
    """Run the requested stages one after the other and return their versions."""
    curriculum = load_curriculum(settings.curriculum)
    registry = Registry(settings.registry)
    options = FederationOptions(
        registry=settings.registry, run_id=settings.run_id, node_wait_s=settings.node_wait_s
    )
    names = stages_to_run(curriculum, registry, settings.stages)
    registry.log_event({"event": "run-start", "run_id": settings.run_id, "stages": names})
    logger.info("run %s: stages %s, registry %s", settings.run_id, names, settings.registry)
    versions = []
    for name in names:
        try:
            versions.append(run_stage(grid, curriculum, name, options))
        except StageFailed as error:
            registry.log_event(
                {
                    "event": "stage-failed",
                    "stage": name,
                    "run_id": settings.run_id,
                    "error": str(error),
                }
            )
            logger.error("stage=%s failed: %s", name, error)
            raise
    registry.log_event({"event": "run-end", "run_id": settings.run_id})
    return versions


def create_server_app(settings: ServerSettings | None = None) -> ServerApp:
    """Create the ServerApp; without ``settings`` it reads them from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        ensure_logging()
        run_settings = settings or ServerSettings.from_run_config(dict(context.run_config))
        run_federation(grid, run_settings)

    return app


app = create_server_app()
