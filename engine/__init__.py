"""Training machinery shared by the scripts (train.py, test.py, chain.py) and the tools: the run
configuration and the Trainer, the training step and meter, evaluation, the checkpoint file format
and the run folder, the optimiser and LR regimes, speed switches, distributed set-up and signals.

It imports errors, models, loss, data, compress and (for the teacher's objective) refinery; refinery
imports one module of it, the checkpoint file format, to load a teacher. The front ends (cli/, the
scripts, torchscope's command line, bench/) import it; models, loss, data, compress and torchscope's
counting core never do."""
