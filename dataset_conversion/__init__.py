"""Converters from public dataset layouts to nnU-Net raw format."""
