"""Constants of the Shapes world: the embedded default that makes flowgrpo runnable without downloads.

The world is chosen so a 2-core CPU can pretrain a prompt-following base model in about an hour
(see DESIGN.md, "Shapes world: what a first trial learned"): 32x32 images on grey, three shapes,
four well-separated colours, objects of one nominal size centred (with 1 px jitter) in the cells of
a 2x2 grid. The grid makes layouts a small discrete set the model can learn; the verifier does not
assume it and judges any image.
"""
from __future__ import annotations

IMAGE_SIZE = 32
BACKGROUND = (128, 128, 128)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (235, 205, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
}
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

GRID = 2  # cells per side
CELL = IMAGE_SIZE // GRID
JITTER = 1  # max centre offset in pixels
CIRCLE_RADIUS = 6.0
SQUARE_HALF = 5  # square side = 10 px
TRIANGLE_BASE = 12.0
TRIANGLE_HEIGHT = 11.0
