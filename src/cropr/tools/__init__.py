"""Tools around the model family: benchmark and timing, pruning heat-maps, model cards, ONNX export, Hub helpers and
the command-line argument types they share."""
