"""Pieces shared by the Triton kernel families: the varlen chunk layout, launch settings."""
