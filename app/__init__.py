"""The federated application: the site script, its configuration, and the centralized baseline."""
