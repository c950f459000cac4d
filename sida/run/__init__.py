"""Running a stage: config, processes, tracking, provenance, command line."""
