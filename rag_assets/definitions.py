"""The Dagster code location: assets, checks, automation, resources and the storage of outputs."""

from collections.abc import Mapping
from typing import Any

import dagster as dg

from rag_assets import assets, automation, checks, config


def environment_resources() -> dict[str, Any]:
    """Resources configured from the environment (see the README's configuration table)."""
    return {
        "source": config.document_source(),
        "nlp": config.nlp_resource(),
        "search_index": config.search_index(for_dagster=True),
        "quality_settings": config.quality(),
        "io_manager": dg.FilesystemIOManager(base_dir=str(config.data_dir() / "assets")),
    }


def make_definitions(resources: Mapping[str, Any]) -> dg.Definitions:
    return dg.Definitions(
        assets=dg.load_assets_from_modules([assets]),
        asset_checks=checks.all_checks(resources["quality_settings"]),
        jobs=[automation.refresh_job],
        schedules=[automation.daily_document_refresh],
        sensors=[automation.initial_index_build],
        resources=dict(resources),
        # The graph is a chain; one process avoids re-importing spaCy and the model for every step.
        executor=dg.in_process_executor,
    )


defs = make_definitions(environment_resources())
