"""What a run compresses with when its flags leave it open: each default is the best recipe measured
by bench/compression_quality.py on real CIFAR-100 (the README's table, bench/results/compression-quality/):
at 75% sparsity with W4/A4 weights and inputs (8-bit first and last layers), the combination below
lost the fewest points against the dense fine-tune of the 11 measured (11.65% top-1 against 37.56%
dense; next LSQ with the layer scope, 10.70%, and this one without freezing, 10.40%; the best
min/max, 7.29%). tests/test_compression_quality_bench.py holds these to that JSON.
"""
# The pruning scope (compress.prune.SCOPES): LAMP scores also measured best at 50% (fp32).
DEFAULT_SCOPE = "global-lamp"
# The quantiser (compress.quant.METHODS): LSQ beat min/max at 4 bits in every scope; at 8 bits they tie.
DEFAULT_METHOD = "lsq"
# The epochs from which QAT's input observers and BatchNorm statistics are frozen (compress.qat):
# after one epoch of QAT, and after another; None: never.
FREEZE_OBSERVERS_EPOCH = 2
FREEZE_BN_EPOCH = 3
