"""Runnable uses of a fine-tuned model: ``python -m embedtune.examples.NAME OUTPUT_DIR``."""
