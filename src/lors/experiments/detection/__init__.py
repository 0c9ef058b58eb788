"""The detection experiments: AdaMixer (+ LORS) training, COCO evaluation, backbone pretraining and the
small-scale compare/ablate benchmark."""
