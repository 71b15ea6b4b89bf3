"""The Study Query LLM dashboard (Panel). Only this package imports panel, holoviews, hvplot
or bokeh; it talks to the library through its services."""
