"""How a run executes its steps."""

import dagster as dg


@dg.definitions
def execution() -> dg.Definitions:
    # The graph is a chain; one process avoids re-importing spaCy and the model for every step.
    return dg.Definitions(executor=dg.in_process_executor)
