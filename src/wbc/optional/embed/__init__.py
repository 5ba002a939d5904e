"""Contrastive embeddings (label-aware SigLIP / SupCon heads, frozen external encoders such as MedSigLIP),
classifiers on them (prototype, k-NN, logistic regression / MLP) and few-shot evaluation. See docs/embed.md."""
