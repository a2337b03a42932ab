"""Training recipes (``method.name``): each a ``Method`` the loop drives one step at a time."""
from __future__ import annotations

import importlib

from eglp_dist.errors import ConfigError

# method.name -> "module:class"; modules are imported only when their method is used.
METHODS = {
    "source_only": "eglp_dist.methods.source_only:SourceOnly",
    "uda": "eglp_dist.methods.uda:UDA",
    "pig": "eglp_dist.methods.pig:PIG",
    "eglp": "eglp_dist.methods.eglp:EGLP",
    "spn": "eglp_dist.methods.spn:SPN",
}


def build_method(cfg, env, device):
    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r}: unknown (available: {', '.join(METHODS)})")
    from eglp_dist.config_fields import check_class_lists

    check_class_lists(cfg.method, cfg.model.num_classes, "method.")
    module_name, cls_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(cfg, env, device)
