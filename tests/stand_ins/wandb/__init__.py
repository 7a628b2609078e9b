"""A stand-in for the ``wandb`` package that records the calls OLMo-core's ``WandBCallback`` makes.

Put ``tests/stand_ins`` on ``PYTHONPATH`` and name a file in ``WANDB_STAND_IN_LOG``: every call
is appended to it as one JSON line. Nothing is sent anywhere.
"""

import json
import os

run = None


def _record(call: str, **fields) -> None:
    with open(os.environ["WANDB_STAND_IN_LOG"], "a") as file:
        file.write(json.dumps({"call": call, **fields}, default=str) + "\n")


class _Run:
    path = "stand-in/run"


def init(**kwargs):
    global run
    run = _Run()
    _record("init", **{key: kwargs[key] for key in ("project", "entity", "group", "name")},
            config_keys=sorted(kwargs.get("config") or {}))
    return run


def log(metrics: dict, step: int) -> None:
    _record("log", step=step, metrics=metrics)


def finish(exit_code: int = 0, quiet: bool = False) -> None:
    _record("finish", exit_code=exit_code)


class Api:
    def __init__(self, **kwargs):
        pass

    def run(self, path):
        return _Run()
