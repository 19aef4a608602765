"""Reusable modules: mixtures of low-rank experts inside linear layers, routers."""
