"""The operator's web pages (the dashboard)."""
