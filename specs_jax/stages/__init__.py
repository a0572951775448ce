"""One short file per pipeline stage; each wires data → step → checkpoints → metrics."""
