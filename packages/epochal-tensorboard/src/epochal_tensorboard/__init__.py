"""epochal integration for report_to=\"tensorboard\" (work in progress)."""

from epochal_core.integrations import IntegrationCallback


class TensorBoardCallback(IntegrationCallback):
    """Placeholder until the integration lands."""

    name = "tensorboard"
