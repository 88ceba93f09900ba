"""What a run compresses with when its flags leave it open: each default is the best recipe measured
by bench/compression_quality.py on real CIFAR-100 (the README's table, bench/results/compression-quality/):
at 75% sparsity with W4/A4 weights and inputs (8-bit first and last layers), the combination below
lost the fewest points against the dense fine-tune of every combination measured.
"""
# The pruning scope (compress.prune.SCOPES).
DEFAULT_SCOPE = "global-lamp"
# The quantiser (compress.quant.METHODS).
DEFAULT_METHOD = "lsq"
# The epochs from which QAT's input observers and BatchNorm statistics are frozen (compress.qat):
# after one epoch of QAT, and after another; None: never.
FREEZE_OBSERVERS_EPOCH = 2
FREEZE_BN_EPOCH = 3
