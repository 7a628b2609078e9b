"""Train an OLMoE with OLMo-core from a YAML config; the same as `olmoe-gatepro train`.

    torchrun --nproc-per-node=8 scripts/train.py configs/olmoe-1b-7b/gatepro.yaml [--gatepro.penalty=1e-3]
"""

import sys

from olmoe_gatepro.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
