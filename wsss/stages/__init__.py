"""Pipeline stages, one module each with a config dataclass and ``run(cfg) -> dict``
(DESIGN.md, "Data flow"); they meet only through files in the run directory."""
