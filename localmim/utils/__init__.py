"""Small leaf helpers shared by every layer (atomic file output, git info, torchrun process groups)."""
