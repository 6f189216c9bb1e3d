"""``retclip-eval benchmark``: the downstream table (datasets x protocols, mean and 95% CI over seeds).

suite.py reads the suite file, layouts.py reads each published dataset layout, splits.py draws the
per-seed splits, protocols.py runs one cell (dataset x protocol x seed) into a predictions CSV, and
results.py turns every predictions CSV into results.csv/.md/.png. run.py is the command.
"""
