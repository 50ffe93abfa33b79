"""accuvqa: visual question answering (MCAN) with exact gradient accumulation."""

__version__ = "0.1.0"
