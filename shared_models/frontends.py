"""Registry of edge front ends: kind name -> (config dataclass, model class).

A bundle's manifest records the front end's kind and its config as a plain
dict (``dataclasses.asdict``), and :func:`build_front_end` rebuilds the
untrained module from them; the weights come from cloud.pt.

- ``"dense"``: S3, :class:`~shared_models.frontend.LearnedFrontEnd`, dense layers on raw patches;
- ``"autoencoder"``: S2, :class:`~shared_models.autoencoder.PatchAutoencoder`, the encoder
  half of an autoencoder on log-mel patches.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import torch.nn as nn

from shared_models.autoencoder import AutoencoderConfig, PatchAutoencoder
from shared_models.frontend import FrontEndConfig, LearnedFrontEnd

FRONT_ENDS: dict[str, tuple[type, type[nn.Module]]] = {
    "dense": (FrontEndConfig, LearnedFrontEnd),
    "autoencoder": (AutoencoderConfig, PatchAutoencoder),
}
FRONT_END_KINDS: tuple[str, ...] = tuple(FRONT_ENDS)


def front_end_classes(kind: str) -> tuple[type, type[nn.Module]]:
    """(config class, model class) of ``kind``, with a helpful error for an unknown kind."""
    try:
        return FRONT_ENDS[kind]
    except KeyError:
        known = ", ".join(FRONT_END_KINDS)
        raise KeyError(f"unknown front end kind {kind!r}; known kinds: {known}") from None


def front_end_config(kind: str, config: dict[str, Any]) -> Any:
    """The config dataclass of ``kind`` from a manifest-style dict (``dataclasses.asdict``,
    possibly through JSON, which turns tuples into lists)."""
    config_cls, _ = front_end_classes(kind)
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field(s) {', '.join(unknown)}")
    values = {}
    for name, value in config.items():
        # JSON has no tuples: give tuple-typed fields (e.g. hidden_dims) their tuples back
        if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        values[name] = value
    return config_cls(**values)


def build_front_end(kind: str, config: dict[str, Any]) -> nn.Module:
    """An untrained front end of ``kind`` rebuilt from its manifest config dict."""
    _, model_cls = front_end_classes(kind)
    return model_cls(front_end_config(kind, config))
