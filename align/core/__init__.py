"""The ground floor: errors, artifacts and provenance, model loading, data formats, recipes and YAML, runtime.

Imports nothing from align.train, align.pipeline, merge or eval."""
