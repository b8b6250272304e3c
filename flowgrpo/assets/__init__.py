"""Files shipped inside the package: the pretrained Shapes base model (diffusers format)."""
from pathlib import Path

SHAPES_MODEL = Path(__file__).parent / "shapes-base"
