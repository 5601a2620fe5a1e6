"""Checkpoint reading and writing (safetensors, sharded, lazy) and HF directory handling."""

from symmerge.io.checkpoint import (
    Checkpoint,
    all_finite,
    atomic_output_dir,
    check_output_dir,
    copy_model_files,
    is_symmerge_output,
    load_state_dict,
    open_checkpoint,
    save_state_dict,
    unique_names,
)

__all__ = [
    "Checkpoint", "all_finite", "atomic_output_dir", "check_output_dir", "copy_model_files", "is_symmerge_output", "load_state_dict", "open_checkpoint",
    "save_state_dict", "unique_names",
]
