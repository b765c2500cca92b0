#!/usr/bin/env python
"""simpo-ds generate on every rank of a launcher (each rank takes its own shard; see simpo_ds.onpolicy.generate).

    torchrun --nproc_per_node 8 launch/generate.py ...
    deepspeed --hostfile hosts launch/generate.py ...
    srun python launch/generate.py ...
"""

import sys

from simpo_ds.onpolicy.generate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
