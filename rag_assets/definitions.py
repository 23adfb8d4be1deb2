"""The Dagster code location: assets, resources and where intermediate outputs are stored."""

from __future__ import annotations

import dagster as dg

from rag_assets import assets, config

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([assets]),
    resources={
        "source": config.document_source(),
        "nlp": config.nlp_resource(),
        "search_index": config.search_index(for_dagster=True),
        "io_manager": dg.FilesystemIOManager(base_dir=str(config.data_dir() / "assets")),
    },
    # The graph is a chain; one process avoids re-importing spaCy and the model for every step.
    executor=dg.in_process_executor,
)
