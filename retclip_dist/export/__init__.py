"""``retclip-eval export``: a saved model in other libraries' own formats, checked against the model.

timm_format.py   the vision tower as a timm checkpoint (and RETFound's fine-tuning checkpoint)
open_clip_format.py  each eye level as an open_clip model (timm vision tower + Hugging Face text tower)
retclip_open_clip.py  RET-CLIP's text head as an open_clip pooler: copied into every open_clip export
check.py         the fixed inputs and the tolerance every export is checked with before it is published
cli.py           the command line
"""
