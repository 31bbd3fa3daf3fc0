"""Linear evaluation of a pretraining checkpoint (SimCLR §2.3), by responsibility.

`features` extracts frozen features (h or any projection-head layer) from the checkpoint's
model; `classifiers` fits the linear probes and the kNN on them and chooses the probe's C;
`evaluate` draws the labelled subset, runs every layer and writes results.json; `reports`
formats the per-class table, the figures and the terminal summary.
"""
