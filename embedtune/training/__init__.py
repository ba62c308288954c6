"""Training: ``trainer`` (the Trainer and its loop), ``step`` (plain and GradCache micro-steps),
``devices`` (precision, activation checkpointing), ``optim``, ``meters``, ``checkpoint``, ``lock``,
``tracking``, ``merge`` (with the base model), ``export`` and ``model_card``."""
