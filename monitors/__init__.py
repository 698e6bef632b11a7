"""Residual-stream reads: linear probes, direction projections and SAE encoders. Pure torch + pydantic."""
