"""The methods comparison: benchmark, runs, report, significance, the stand-in pretraining recipe and its probe."""
