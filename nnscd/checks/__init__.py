"""Checks of user input (datasets, trainings, predictions, trainer names) that run before nnU-Net does any work."""
