"""`cat-ds annotate`: causal (key, value) annotation of CAT records by an LLM behind any
OpenAI-compatible chat-completions endpoint, validated with the project's matching rule,
concurrent, retried, resumable."""

from cat_ds.annotate.parsing import ParseError, parse_answer, validate_pairs
from cat_ds.annotate.prompts import DEFAULT_EXAMPLES, DEFAULT_TEMPLATE
from cat_ds.annotate.runner import AnnotateConfig, AnnotateError, annotate_file, format_summary

__all__ = [
    "AnnotateConfig", "AnnotateError", "DEFAULT_EXAMPLES", "DEFAULT_TEMPLATE", "ParseError",
    "annotate_file", "format_summary", "parse_answer", "validate_pairs",
]
