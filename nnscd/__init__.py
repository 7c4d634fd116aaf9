"""nnscd: nnU-Net v2 with token-sparse transformers."""
