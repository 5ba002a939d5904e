"""Self-supervised in-domain pretraining (DINO, FastSiam through lightly) from the offline ImageNet weights or from
scratch, with multi-crop and damage-simulator views and an optional cell-region filter, and the prototype-guided
selection of the images to pretrain on. See docs/ssl.md."""
