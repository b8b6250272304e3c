"""Files shipped inside the package: the pretrained Shapes base models (diffusers format)."""
from pathlib import Path

SHAPES_MODEL = Path(__file__).parent / "shapes-base"  # flow matching (StableDiffusion3Pipeline)
SHAPES_MDM = Path(__file__).parent / "shapes-mdm"  # masked diffusion (AmusedPipeline + its schedule)
