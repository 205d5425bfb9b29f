"""epochal integration for report_to=\"neptune\" (work in progress)."""

from epochal_core.integrations import IntegrationCallback


class NeptuneCallback(IntegrationCallback):
    """Placeholder until the integration lands."""

    name = "neptune"
