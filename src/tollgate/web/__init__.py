"""The dashboard: usage log, users, limits, overview, and the ``/api/v1/`` JSON/CSV API."""
