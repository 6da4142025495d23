"""Training: crops prepared in the anatomical frame, the segmenter and the classifier."""
