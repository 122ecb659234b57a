"""The NVFlare jobs: recipe, export, simulator runner, POC network, submission, and the demo."""
