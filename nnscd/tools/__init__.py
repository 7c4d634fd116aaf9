"""Tools beyond nnU-Net's commands: benchmarks, token maps, the attention ablation, the MSD submission, the demo."""
