"""A trained token-sparse model loaded as nnU-Net's predictor loads it, with checks that name the missing piece and
the trainers that fit (used by nnScd_token_maps and nnScd_attention_ablation)."""
import os
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import torch

from nnscd.checks.input_checks import trained_folds
from nnscd.core.errors import UserError
from nnscd.networks.token_sparse_primus import TokenSparsePrimus
from nnscd.networks.token_sparse_vit import TokenSparseSegmenter

if TYPE_CHECKING:  # nnunetv2 is imported only after the environment is settled
    from nnscd.core.predictor import nnScdPredictor

TokenSparseNetwork = Union[TokenSparseSegmenter, TokenSparsePrimus]  # grid, token_size, config, last_keep_indices


def token_sparse_trainers(sparse: Optional[bool] = None, primus: bool = True) -> List[str]:
    """nnscd's STP+MTA trainers (ViT family, and the Primus family unless primus=False); only pruning ones
    (sparse=True) or only dense twins (sparse=False)."""
    import nnscd_trainers
    from nnscd_trainers.primus_trainers import TokenSparsePrimusTrainer
    from nnscd_trainers.token_sparse_trainers import TokenSparseTrainer

    families = (TokenSparseTrainer, TokenSparsePrimusTrainer) if primus else (TokenSparseTrainer,)
    classes = [getattr(nnscd_trainers, name) for name in nnscd_trainers.__all__]
    return sorted(c.__name__ for c in classes if issubclass(c, families) and sparse in (None, c.prunes()))


def require_token_sparse(network: torch.nn.Module, trainer_name: str, tool: str,
                         primus: bool = True) -> TokenSparseNetwork:
    """The token-sparse network inside `network` (DDP / torch.compile wrappers removed), or a clear error."""
    from nnscd.core.device import unwrap

    network = unwrap(network)
    accepted = (TokenSparseSegmenter, TokenSparsePrimus) if primus else (TokenSparseSegmenter,)
    if not isinstance(network, accepted):
        raise UserError(f"{tool} needs a token-sparse network ({' or '.join(a.__name__ for a in accepted)}), but "
                        f"trainer {trainer_name} builds {type(network).__name__}. It works with these trainers: "
                        f"{', '.join(token_sparse_trainers(primus=primus))}.")
    return network


def require_pruning(network: TokenSparseNetwork, trainer_name: str) -> None:
    """Token maps of a dense twin would be empty: stop and name the trainers that prune."""
    if not network.config.sparse:
        raise UserError(f"trainer {trainer_name} builds a dense network (no pruning stages), so no tokens are "
                        f"dropped and there is nothing to draw. Token maps need a trainer that prunes: "
                        f"{', '.join(token_sparse_trainers(sparse=True))}.")


def check_model_folder(model_folder: str, folds: Sequence[str], checkpoint: str) -> None:
    """Name the missing piece before nnU-Net fails on it with a bare FileNotFoundError."""
    if not os.path.isfile(os.path.join(model_folder, "plans.json")):
        raise UserError(f"{model_folder} is not a trained model folder (no plans.json). Pass the folder "
                        f"TRAINER__PLANS__CONFIGURATION that holds fold_X subfolders (-m).")
    trained = [f"fold_{f}" for f in trained_folds(model_folder, checkpoint)]
    missing = [f for f in folds if f"fold_{f}" not in trained]
    if missing:
        raise UserError(f"no {checkpoint} for fold(s) {', '.join(missing)} in {model_folder}; folds with one: "
                        f"{', '.join(trained) or 'none'} (-f, -chk).")


def load_model(model_folder: str, folds: Sequence[str], checkpoint: str, device: str, tool: str,
               use_mirroring: bool = False, primus: bool = True) -> Tuple["nnScdPredictor", TokenSparseNetwork]:
    """nnU-Net's predictor for the trained model (nnscd's, with atomic exports) and its token-sparse network."""
    from nnscd.core.predictor import nnScdPredictor

    check_model_folder(model_folder, folds, checkpoint)
    predictor = nnScdPredictor(use_mirroring=use_mirroring, device=torch.device(device),
                               perform_everything_on_device=device == "cuda", allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, list(folds), checkpoint)
    return predictor, require_token_sparse(predictor.network, predictor.trainer_name, tool, primus)
