"""Serving: what is done with a trained checkpoint outside training. Top-K recommendation lists,
ranking evaluation, and the export of an unsharded model and a plain-torch serving artifact."""
