"""One module per dashboard tab; each defines a `pn.viewable.Viewer` taking the AppState."""
