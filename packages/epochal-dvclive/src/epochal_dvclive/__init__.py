"""epochal integration for report_to=\"dvclive\" (work in progress)."""

from epochal_core.integrations import IntegrationCallback


class DVCLiveCallback(IntegrationCallback):
    """Placeholder until the integration lands."""

    name = "dvclive"
