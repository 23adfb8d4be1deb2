"""The code location: every definition under `rag_assets/defs/`, loaded by Dagster's defs loader."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg


def load_definitions() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).resolve().parent)


def with_resources(definitions: dg.Definitions, resources: Mapping[str, Any]) -> dg.Definitions:
    """The same definitions with other resources (tests, benchmarks)."""
    return dg.Definitions(
        assets=definitions.assets,
        asset_checks=definitions.asset_checks,
        jobs=definitions.jobs,
        schedules=definitions.schedules,
        sensors=definitions.sensors,
        executor=definitions.executor,
        resources=dict(resources),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return load_definitions()
