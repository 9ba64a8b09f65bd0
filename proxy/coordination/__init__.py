"""Collapsing identical fetches across tasks and worker processes; the optional Redis tier."""
