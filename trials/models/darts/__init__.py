"""DARTS-space models of the AutoML study (PROTOCOLS 1.2, 1.3): ops, genotypes, NetworkCIFAR,
architecture statistics. Importing this package registers the 10 NAS models (``family="nas"``)
and the 3 mitigation variants (``family="variant"``) in :data:`~nasrisk.trials.registry.MODELS`.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from ...registry import MODELS
from .genotypes import (
    GENOTYPES,
    NAS_GENOTYPES,
    VARIANT_GENOTYPES,
    Genotype,
    format_genotype,
    get_genotype,
    parse_genotype,
)
from .network import NetworkCIFAR, ParamSet, build_network


def build_darts_model(genotype: Genotype, *, num_classes: int, input_size: int = 32, C: int = 36,
                      layers: int = 20, params: ParamSet = "paper", auxiliary: bool = False,
                      drop_path: float | None = None) -> nn.Module:
    """The MODELS builder shared by every genotype (see :func:`build_network`)."""
    return build_network(genotype, num_classes=num_classes, input_size=input_size, C=C,
                         layers=layers, params=params, auxiliary=auxiliary, drop_path=drop_path)


def build_from_genotype_string(*, genotype: str, num_classes: int, input_size: int = 32,
                               C: int = 36, layers: int = 20, params: ParamSet = "paper",
                               auxiliary: bool = False, drop_path: float | None = None,
                               ) -> nn.Module:
    """``MODELS["genotype"]``: the network of a genotype given as a string
    (:func:`~nasrisk.trials.models.darts.genotypes.parse_genotype`), e.g. one a DARTS search
    found (PROTOCOLS 6: each found genotype is trained from scratch), as a lineage base
    ``{model: genotype, model_kwargs: {genotype: "Genotype(normal=[...], ...)"}}``."""
    return build_darts_model(parse_genotype(genotype), num_classes=num_classes,
                             input_size=input_size, C=C, layers=layers, params=params,
                             auxiliary=auxiliary, drop_path=drop_path)


def _register() -> None:
    for family, table in (("nas", NAS_GENOTYPES), ("variant", VARIANT_GENOTYPES)):
        for name, genotype in table.items():
            MODELS.register(name, partial(build_darts_model, genotype), family=family,
                            source=genotype.source, genotype=genotype, darts_space=True)
    MODELS.register("genotype", build_from_genotype_string, family="searched",
                    source="a genotype string (e.g. found by a search)", darts_space=True)


_register()

__all__ = ["GENOTYPES", "Genotype", "NetworkCIFAR", "build_darts_model", "build_from_genotype_string",
           "build_network", "format_genotype", "get_genotype", "parse_genotype"]
