"""Data: typed schema, synthetic study, prompt rendering and loaders (see each module)."""

from grailcore.data.loaders import LoadResult, load_examples
from grailcore.data.prompt import build_example
from grailcore.data.synth import generate_study

__all__ = ["LoadResult", "build_example", "generate_study", "load_examples"]
