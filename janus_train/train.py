"""``janus-train``: the Hydra training app. Composes the config tree, validates it, and runs
one stage (the loop lives in this file; see issue 4).

    janus-train experiment=janus_pro_1b stage=stage2 deepspeed=zero3 [key=value ...]
    janus-train ... --cfg job        # print the composed config and exit
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from janus_train.config import CONF_DIR, RunConfig, to_run_config


def run(cfg: RunConfig) -> None:
    raise NotImplementedError("the training loop lands with the trainer issue")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> None:
    run(to_run_config(dcfg))


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
