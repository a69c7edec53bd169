"""intent-worker: streaming intent classification with a self-improving distillation loop."""

__version__ = "0.1.0"
