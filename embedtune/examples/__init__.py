"""Runnable uses of a fine-tuned model: ``python -m embedtune.examples.NAME OUTPUT_DIR``.

- ``semantic_search``: the run's answers embedded once, the best ones for a few questions.
- ``qa_retrieval``: held-out (or given) questions against all answers; how many find their own first.
- ``similarity``: the cosine similarity of questions with answers, as a matrix.
- ``batch_search``: many queries from a file, a batch at a time, the hits written as JSONL.
- ``vector_db``: the same search in an embedded LanceDB table (``pip install 'embedtune[vectordb]'``).

Each applies the model's query and document prompts. ``embedtune search`` is the command-line
tool for the same job, with an index kept on disk.
"""
