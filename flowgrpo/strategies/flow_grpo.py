"""Flow-GRPO: SDE sampling on every step of the window (the first ``sde_steps``, 0 = all), every SDE step trained.
The base strategy is exactly this."""
from flowgrpo.strategies.base import FlowStrategy


class FlowGRPO(FlowStrategy):
    """Flow-GRPO: SDE on every step of the window (the first sde_steps, 0 = all), every SDE step trained."""

    name = "flow_grpo"
