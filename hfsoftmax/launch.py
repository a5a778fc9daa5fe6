"""Helpers for the launch scripts: what the parameter server needs to know about a run.

``python -m hfsoftmax.launch server-args --config C [key=value ...]`` prints, one per line, the
arguments ``paramserver/paramserver.py`` must get so that its store matches the trainer: K (read from
the dataset when ``data.path`` is set), d, the classifier's SGD settings and the class index.
``... get KEY [KEY ...]`` prints resolved config values, one per line (e.g. ``train.out_dir``). Both exit 2 with a
one-line message on bad input, like the trainer.
"""
from __future__ import annotations

import argparse
import sys

from .config import Config, ConfigError, load_config


def num_classes_of(cfg: Config) -> int:
    if not cfg.data.path:
        return cfg.data.num_classes
    from .data.datasets import dataset_from_path

    return int(dataset_from_path(cfg.data.path, cfg.data.image_size, train=True, skip_bad=cfg.data.skip_bad,
                                 labels=cfg.data.labels).num_classes)


def server_args(cfg: Config, num_clients: int) -> list[str]:
    """paramserver.py's flags for the store and index this run would open in-process (the same specs)."""
    from .heads.selective import index_spec, store_spec

    num_classes = num_classes_of(cfg)
    return store_spec(cfg, num_classes, num_clients).cli_args() + index_spec(cfg.head, num_classes).cli_args()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hfsoftmax.launch")
    p.add_argument("what", choices=("server-args", "get"))
    p.add_argument("--config", default=None)
    p.add_argument("--num-clients", type=int, default=1)
    p.add_argument("--world", type=int, default=1, help="ranks of the run (resolves store.kind=auto)")
    p.add_argument("rest", nargs="*", help="for get: the KEYs first; then key=value overrides")
    a = p.parse_intermixed_args(argv)
    try:
        rest = list(a.rest)
        keys = []
        while a.what == "get" and rest and "=" not in rest[0]:
            keys.append(rest.pop(0))
        cfg = load_config(a.config, rest)
        if a.what == "get" and "store.kind" in keys and cfg.store.kind == "auto" and cfg.head.name in ("hf", "random"):
            from .heads.sharded import resolve_store_kind
            cfg.store.kind, why = resolve_store_kind(cfg, num_classes_of(cfg), a.world)
            print(f"store.kind=auto: {cfg.store.kind}: {why}", file=sys.stderr)
        if a.what == "get":
            for key in keys:
                value: object = cfg
                for part in key.split("."):
                    if not hasattr(value, part):
                        raise ConfigError(f"unknown config key '{key}'")
                    value = getattr(value, part)
                print(value)
        else:
            print("\n".join(server_args(cfg, a.num_clients)))
        return 0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
