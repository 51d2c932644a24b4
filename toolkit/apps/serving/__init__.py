"""The parts of `toolkit serve` (`toolkit.apps.serve`): the Open Inference Protocol's messages
(`protocol`), the dynamic batcher (`batcher`) and the Prometheus metrics (`metrics`). Torch-free."""
