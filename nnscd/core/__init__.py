"""Core of nnscd: paths, safe writes, the predictor, token planning, device helpers, errors and nnU-Net's hooks.

Imported by trainers, checks, tools and entry points; imports only networks, nnunetv2 and libraries."""
