"""Time: the injected clocks, window boundaries, horizon profiles and the open window."""
