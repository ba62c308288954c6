"""Q&A data: ``records`` (reading and parsing), ``split`` (held-out pairs, the reads before
training), ``stream`` (the ordered, sharded, resumable stream), ``collate`` (tokenizing into the
typed ``TrainBatch``), ``identity`` (what a run read, compared on resume)."""
