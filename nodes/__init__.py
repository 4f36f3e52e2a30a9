"""The Weightsmith ComfyUI node pack (loaded from the repository's root ``__init__.py`` only
when ComfyUI is the host). Heavy imports happen inside the node functions."""

from .erase_node import WeightsmithEraseConcepts
from .merge_nodes import WeightsmithIterISMerge, WeightsmithLoraStack
from .save_node import WeightsmithSaveEditAsLora, register_output_loras

NODE_CLASS_MAPPINGS = {
    "WeightsmithEraseConcepts": WeightsmithEraseConcepts,
    "WeightsmithLoraStack": WeightsmithLoraStack,
    "WeightsmithIterISMerge": WeightsmithIterISMerge,
    "WeightsmithSaveEditAsLora": WeightsmithSaveEditAsLora,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WeightsmithEraseConcepts": "Erase Concepts (Weightsmith)",
    "WeightsmithLoraStack": "LoRA Stack (Weightsmith)",
    "WeightsmithIterISMerge": "IterIS Merge (Weightsmith)",
    "WeightsmithSaveEditAsLora": "Save Edit as LoRA (Weightsmith)",
}

try:
    register_output_loras()
except Exception:  # never let a path quirk make the whole pack vanish
    pass

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
