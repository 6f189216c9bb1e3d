"""retclip-dist: distributed pretraining of RET-CLIP on colour fundus photographs and reports."""

__version__ = "0.1.0"
