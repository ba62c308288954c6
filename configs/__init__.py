"""Training recipes, shipped inside the package as embedtune.configs (see setup.cfg)."""
