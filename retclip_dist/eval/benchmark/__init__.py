"""``retclip-eval benchmark``: the downstream table (models x datasets x protocols, mean and 95% CI over
seeds, and each model's paired difference against the first).

suite.py reads the suite file, layouts.py reads each published dataset layout, splits.py draws the
per-seed splits, protocols.py runs one cell (dataset x protocol x seed) into a predictions CSV, and
results.py turns every predictions CSV into results.csv/.md/.png and differences.csv. run.py is the
command. The models themselves (ours, RETFound, FLAIR, open_clip, timm...) are adapters in eval/models/.
"""
