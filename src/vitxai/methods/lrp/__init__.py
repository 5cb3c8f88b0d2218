"""The LRP family: importing this package registers its methods.

- :mod:`.rules`: the per-layer rules of the explicit relevance passes, one implementation each
  (LRP α1β0 / gradient × input of Chefer 2021a; absLRP's ``abs_*`` rules; shared sums and
  stabilisers).
- :mod:`.chefer`: Chefer 2021a and its siblings (LRP rollout, last layer, full pixel LRP).
- :mod:`.abslrp`: absLRP and contrastive relevance (Vukadin et al. 2024).
- :mod:`.abslrp_cnn`: absLRP's pass through timm VGG and ResNet CNNs.
- :mod:`.attnlrp`: AttnLRP and CP-LRP (Achtibat et al. 2024) through modified gradients.
"""

from vitxai.methods.lrp import abslrp, attnlrp, chefer, rules
from vitxai.methods.lrp.abslrp import AbsLRPParams, contrastive_relevance
from vitxai.methods.lrp.attnlrp import AttnLRPParams, CPLRPParams, lrp_relevance, lrp_rules
from vitxai.methods.lrp.chefer import CheferParams, FullLrpParams, LastLayerParams

__all__ = [
    "AbsLRPParams",
    "AttnLRPParams",
    "CPLRPParams",
    "CheferParams",
    "FullLrpParams",
    "LastLayerParams",
    "abslrp",
    "attnlrp",
    "chefer",
    "contrastive_relevance",
    "lrp_relevance",
    "lrp_rules",
    "rules",
]
