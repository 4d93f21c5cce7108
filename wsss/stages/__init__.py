"""Pipeline stages, one module each with a config dataclass and ``run(cfg) -> dict``;
they meet only through files in the run directory."""
