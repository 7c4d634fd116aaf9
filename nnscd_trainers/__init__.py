"""nnU-Net trainers of nnscd. Every class named in __all__ is found by `-tr NAME` in all nnScd_ commands."""
from nnscd_trainers.nnscd_trainer import nnScdTrainer, nnScdTrainer_budget, nnScdTrainer_cpu
from nnscd_trainers.apformer_trainers import (APFormerNoPruneTrainer, APFormerNoPruneTrainer_budget,
                                                APFormerNoPruneTrainer_cpu, APFormerTrainer, APFormerTrainer_budget,
                                                APFormerTrainer_cpu, APFormerTrainer_steps100)
from nnscd_trainers.primus_trainers import (
    PrimusV3BTrainer_budget, PrimusV3STrainer_budget, PrimusV3STrainer_cpu, STPMTAPrimusV3BTrainer,
    STPMTAPrimusV3BTrainer_budget, STPMTAPrimusV3LTrainer, STPMTAPrimusV3MTrainer, STPMTAPrimusV3STrainer,
    STPMTAPrimusV3STrainer_budget, STPMTAPrimusV3STrainer_cpu, STPMTAPrimusV3STrainer_keep50,
    STPMTAPrimusV3STrainer_keep50_budget, STPMTAPrimusV3STrainer_noMTA, STPMTAPrimusV3STrainer_cumulative,
    STPMTAPrimusV3STrainer_cumulative_budget, STPMTAPrimusV3STrainer_fgprior, STPMTAPrimusV3STrainer_fgprior_budget,
    STPMTAPrimusLightTrainer, PrimusLightTrainer, STPMTAPrimusLightTrainer_budget, PrimusLightTrainer_budget,
    STPMTAPrimusLightTrainer_cpu, PrimusLightTrainer_cpu, STPMTAPrimusV3STrainer_equalcompute,
    STPMTAPrimusLightTrainer_equalcompute, PrimusLightTrainer_equalcompute)
from nnscd_trainers.token_sparse_trainers import (
    STPMTALightTrainer, STPMTALightTrainer_cpu, STPMTALightTrainer_paper, STPMTATrainer, STPMTATrainer_cpu,
    STPMTATrainer_demo, STPMTATrainer_budget, UNETRTrainer_budget, STPMTALightTrainer_budget, ViTLightTrainer_budget,
    STPMTATrainer_gumbel, STPMTATrainer_keep25, STPMTATrainer_keep75, STPMTATrainer_paper, UNETRTrainer,
    UNETRTrainer_cpu, UNETRTrainer_paper, ViTLightTrainer, ViTLightTrainer_cpu, ViTLightTrainer_paper,
    ViTLightTrainer_heinit, STPMTALightTrainer_heinit, ViTLightTrainer_convstem, STPMTALightTrainer_convstem,
    ViTLightTrainer_heinit_budget, STPMTALightTrainer_heinit_budget, ViTLightTrainer_convstem_budget,
    STPMTALightTrainer_convstem_budget, STPMTATrainer_fgprior, STPMTATrainer_fgprior_budget,
    ViTLightTrainer_layerscale, STPMTALightTrainer_layerscale, ViTLightTrainer_layerscale_budget,
    STPMTALightTrainer_layerscale_budget, STPMTATrainer_equalcompute, UNETRTrainer_equalcompute)

__all__ = ["nnScdTrainer", "nnScdTrainer_cpu", "nnScdTrainer_budget",
           "APFormerTrainer", "APFormerNoPruneTrainer", "APFormerTrainer_cpu", "APFormerNoPruneTrainer_cpu",
           "APFormerTrainer_budget", "APFormerNoPruneTrainer_budget", "APFormerTrainer_steps100",
           "STPMTATrainer", "UNETRTrainer", "STPMTALightTrainer", "ViTLightTrainer",
           "STPMTATrainer_paper", "UNETRTrainer_paper", "STPMTALightTrainer_paper", "ViTLightTrainer_paper",
           "STPMTATrainer_keep75", "STPMTATrainer_keep25", "STPMTATrainer_gumbel",
           "STPMTATrainer_cpu", "STPMTATrainer_demo", "STPMTATrainer_budget", "UNETRTrainer_budget",
           "STPMTALightTrainer_budget", "ViTLightTrainer_budget", "UNETRTrainer_cpu", "STPMTALightTrainer_cpu", "ViTLightTrainer_cpu",
           "STPMTAPrimusV3STrainer", "STPMTAPrimusV3BTrainer", "STPMTAPrimusV3MTrainer", "STPMTAPrimusV3LTrainer",
           "STPMTAPrimusV3STrainer_keep50", "STPMTAPrimusV3STrainer_noMTA", "STPMTAPrimusV3STrainer_cpu",
           "STPMTAPrimusV3STrainer_budget", "STPMTAPrimusV3STrainer_keep50_budget", "STPMTAPrimusV3BTrainer_budget",
           "PrimusV3STrainer_cpu", "PrimusV3STrainer_budget", "PrimusV3BTrainer_budget",
           "STPMTAPrimusV3STrainer_cumulative", "STPMTAPrimusV3STrainer_cumulative_budget",
           "ViTLightTrainer_heinit", "STPMTALightTrainer_heinit", "ViTLightTrainer_convstem",
           "STPMTALightTrainer_convstem", "ViTLightTrainer_heinit_budget", "STPMTALightTrainer_heinit_budget",
           "ViTLightTrainer_convstem_budget", "STPMTALightTrainer_convstem_budget",
           "STPMTAPrimusV3STrainer_fgprior", "STPMTAPrimusV3STrainer_fgprior_budget", "STPMTATrainer_fgprior",
           "STPMTATrainer_fgprior_budget", "ViTLightTrainer_layerscale", "STPMTALightTrainer_layerscale",
           "ViTLightTrainer_layerscale_budget", "STPMTALightTrainer_layerscale_budget",
           "STPMTAPrimusLightTrainer", "PrimusLightTrainer", "STPMTAPrimusLightTrainer_budget", "PrimusLightTrainer_budget",
           "STPMTAPrimusLightTrainer_cpu", "PrimusLightTrainer_cpu", "STPMTAPrimusV3STrainer_equalcompute",
           "STPMTAPrimusLightTrainer_equalcompute", "PrimusLightTrainer_equalcompute", "STPMTATrainer_equalcompute",
           "UNETRTrainer_equalcompute"]
