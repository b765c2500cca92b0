#!/usr/bin/env python
"""simpo-ds score on every rank of a launcher (each rank takes its own shard; see simpo_ds.onpolicy.score).

    torchrun --nproc_per_node 8 launch/score.py ...
    deepspeed --hostfile hosts launch/score.py ...
    srun python launch/score.py ...
"""

import sys

from simpo_ds.onpolicy.score import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
