"""Explaining a network, tensors in and tensors out: the forward plan, activations, deconvnet, inversion, the
batched row optimiser, CUDA graphs, dataset examples, feature visualization."""
