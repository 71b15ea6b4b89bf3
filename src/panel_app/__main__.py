"""`python -m panel_app` starts the dashboard."""

from .server import main

main()
