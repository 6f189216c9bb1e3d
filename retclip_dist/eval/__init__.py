"""Downstream evaluation of a trained RetClip: features, zero-shot, linear probe, fine-tuning."""

from retclip_dist.eval.synthetic import demo_probe, write_labelled_set

__all__ = ["demo_probe", "write_labelled_set"]
