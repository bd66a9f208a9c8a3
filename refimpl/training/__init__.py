"""refformer.refimpl.training: training the reference — corpora (data), batching, the training loop with its
checkpoints, CSV log and loss plot. It uses the math in refformer.refimpl and adds file formats around it; see
docs/DESIGN.md ("Layout")."""
