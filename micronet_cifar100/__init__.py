"""What the toolkit's packages share under the project's own name, so that installing the project
adds no generic top-level module: the typed errors (micronet_cifar100.errors) and the command-line
front ends' shared parts (micronet_cifar100.cli: flag types, train.py's flags and RunConfig, the
one-line messages and exit codes)."""
