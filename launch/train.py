#!/usr/bin/env python
"""simpo-ds training entry point.

    deepspeed --hostfile hosts launch/train.py --ds ds_configs/zero3.json --config recipes/x.yaml [--key value ...]
    deepspeed --num_gpus 8 launch/train.py --ds ds_configs/zero3.json --config recipes/x.yaml
    torchrun --nproc_per_node 8 launch/train.py --ds ds_configs/zero3.json --config recipes/x.yaml
    python launch/train.py --config recipes/tiny_cpu.yaml          # one process

Every config key (see README) can be overridden as --key value; --ds is an alias of --deepspeed.
"""

import sys

from simpo_ds.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
