"""``python -m convert`` from a checkout: a thin launcher for ``refusion_mlx.convert`` (not installed)."""
