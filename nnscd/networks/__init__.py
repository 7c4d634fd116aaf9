"""Pure PyTorch networks of nnscd. Nothing in here imports nnU-Net."""
