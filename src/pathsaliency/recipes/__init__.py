"""End-to-end recipes: pruned and quantized ResNets with their certified robustness bounds."""
