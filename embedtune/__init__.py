"""embedtune: fine-tune sentence-embedding models on question/answer pairs."""

__version__ = "0.1.0"
