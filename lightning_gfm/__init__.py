"""lightning-gfm: Gradient Flow Matching for PyTorch Lightning.

``GFMCallback`` forecasts a run's own weight trajectory with an optimizer-aware vector field and jumps ahead
along it, undoing every jump that does not help. ``import lightning_gfm`` imports neither torchdyn nor wandb.
"""

from lightning_gfm.callback import GFMCallback, auto_schedule
from lightning_gfm.dynamics import SUPPORTED, Dynamics, dynamics_for, future_learning_rates
from lightning_gfm.fields import load_field, save_field
from lightning_gfm.flow.field import FieldConfig, GradientField
from lightning_gfm.forecast import ForecastPath, backtest_error, forecast
from lightning_gfm.jump import JumpOutcome, JumpRecord, StatePolicy
from lightning_gfm.metrics import (
    ForecastDirectionCosine,
    ForecastRelativeError,
    forecast_direction_cosine,
    forecast_relative_error,
)
from lightning_gfm.params import ParamSpec
from lightning_gfm.trajectory import Snapshot, TrajectoryBuffer

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED",
    "Dynamics",
    "FieldConfig",
    "ForecastDirectionCosine",
    "ForecastPath",
    "ForecastRelativeError",
    "GFMCallback",
    "GradientField",
    "JumpOutcome",
    "JumpRecord",
    "ParamSpec",
    "Snapshot",
    "StatePolicy",
    "TrajectoryBuffer",
    "__version__",
    "auto_schedule",
    "backtest_error",
    "dynamics_for",
    "forecast",
    "forecast_direction_cosine",
    "forecast_relative_error",
    "future_learning_rates",
    "load_field",
    "save_field",
]
