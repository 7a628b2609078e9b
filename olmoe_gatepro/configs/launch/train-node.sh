#!/bin/bash
# {{title}}
# Rendered by olmoe-gatepro from olmoe_gatepro/configs/launch/train-node.sh, for clusters without
# SLURM. Start it on each of the {{nodes}} nodes at about the same time, with HEAD set to the host
# name of one of them (the same on every node); torchrun's c10d rendezvous on HEAD:{{port}} gives
# every node its rank:
#     HEAD=node001 bash {{script}}
# Stop gracefully (a checkpoint is saved first): touch {{save_folder}}/{{stop_file}}
# Resume after any stop: remove that file if present, and start the script on every node again.
set -euo pipefail
: "${HEAD:?set HEAD to the host name of the rendezvous node, the same on every node}"
SAVE_FOLDER={{save_folder}}
if [ -e "$SAVE_FOLDER/{{stop_file}}" ]; then
    echo "$SAVE_FOLDER/{{stop_file}} exists and would stop the training at once; remove it to train" >&2
    exit 2
fi
{{setup}}
# One W&B run across restarts (used when callbacks.wandb is enabled).
export WANDB_RUN_ID={{wandb_run_id}} WANDB_RESUME=allow
exec {{python}} -m torch.distributed.run --nnodes={{nodes}} --nproc-per-node={{procs_per_node}} \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:{{port}}" --rdzv-id={{rdzv_id}} --max-restarts=0 \
    {{train_command}}
