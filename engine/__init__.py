"""Training machinery shared by train.py, test.py, chain.py and the tools: errors, checkpoints,
LR regime, run folders, metrics, distributed set-up."""
