"""Training: ``trainer`` (the Trainer and its loop), ``step`` (plain and GradCache micro-steps),
``devices`` (precision, activation checkpointing), ``optim``, ``meters``, ``checkpoint``, ``lock``,
``tracking``, ``export`` and ``model_card``."""
