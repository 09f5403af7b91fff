"""Stage 2, backbone: the pretrained CNNs, their layers, the modules that become the graph."""
