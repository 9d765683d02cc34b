"""A Hydra app around a tvlang job: every field of ``conf/config.yaml`` can be overridden, and a
multirun sweeps them, one merge per combination, each written to its own Hydra job directory::

    python examples/config/hydra_app.py                                    # one merge
    python examples/config/hydra_app.py -m merge.params.lam=0.2,0.4,0.6    # three
    python examples/config/hydra_app.py -m 'tasks=[amazon_sent],[amazon_sent,yelp_lm]' ckpt=/data/ckpt

Needs ``pip install 'tvlang[config]' hydra-core``.  tvlang itself never imports Hydra: the app
hands the resolved ``merge`` node to :func:`tvlang.config.run_job`.
"""

from __future__ import annotations

import hydra
from hydra.utils import get_original_cwd
from omegaconf import DictConfig

from tvlang.config import register_resolver, run_job

register_resolver()  # ${tvlang.sum:${tasks}} in the config: a list of names -> "(a + b)"


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # relative paths in the config are relative to where the app was started
    written = run_job(cfg.merge, base_dir=get_original_cwd(), progress=False)
    print(f"lam={cfg.merge.params.lam} tasks={list(cfg.tasks)}: wrote {written}")


if __name__ == "__main__":
    main()
