"""epochal integration for report_to=\"comet_ml\" (work in progress)."""

from epochal_core.integrations import IntegrationCallback


class CometCallback(IntegrationCallback):
    """Placeholder until the integration lands."""

    name = "comet_ml"
