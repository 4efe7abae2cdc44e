"""Model: Table 1 as data, the VGG module, weights, the fc7 extractor and the dense descriptor."""
