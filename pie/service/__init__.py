"""The reactor side of a model: ModelService, Resources, Scheduler, exports, placement (no torch)."""
