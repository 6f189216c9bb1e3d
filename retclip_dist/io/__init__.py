"""Reading and writing files wherever they live (local paths or any fsspec URL such as s3://).

``files``: path helpers and an output directory with atomic writes. ``roots``: image roots (directory,
zip, tar, tar.gz, s3:// prefix) read by reference. ``errors``: what they raise. Nothing here knows about
shards, rejects or labels: make-shards maps these errors to its reject reasons, retclip-eval to its own
messages.
"""
