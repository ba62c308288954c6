"""Training: ``trainer`` (the Trainer and its loop), ``step`` (plain and GradCache micro-steps),
``optim``, ``meters``, ``checkpoint``, ``tracking``, ``export`` and ``model_card``."""
