"""Training machinery shared by train.py, test.py, chain.py and the tools: the training step and
meter, evaluation, checkpoints and their saver, LR regimes, run folders, speed switches,
distributed set-up and signals. It imports models, loss, data and refinery, and is imported by the
scripts, cli/ and bench/ only."""
