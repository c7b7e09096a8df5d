"""Layers of keras-qat: FakeQuant, the float fusion layers, their quantized versions."""
