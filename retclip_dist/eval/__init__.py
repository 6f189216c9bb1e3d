"""Downstream evaluation of a trained RetClip (``retclip-eval``): features, zero-shot, linear probe,
fine-tuning. Import the submodules themselves; this package imports nothing, so importing one command's
module does not load the others."""
