"""cat-ds: Causal Attention Tuning (CAT) of large language models at cluster scale."""

__version__ = "0.1.0"
