"""fxquant backends: ways to run a QuantizedModel faster than its reference ops."""
