"""What ``WandBCallback.check_if_canceled`` imports from ``wandb.errors``."""


class CommError(Exception):
    pass
