"""The embedding model: ``encoder`` (load, pool, export), ``packing`` (input layouts and packed
attention), ``folder`` (the one reader of a model folder), ``modules`` (Dense, loading the
transformer), ``lora`` (adapters through peft)."""
