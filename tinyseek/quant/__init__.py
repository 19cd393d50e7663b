"""Weight-only quantization (W8A16 / W4A16), calibration, QAT. Read in this order:

- ``ops.py``        pure maths: symmetric scales, quantize/dequantize, int4 nibble packing
- ``modules.py``    ``QuantLinear``, ``QuantExperts`` (stacked MoE experts), ``QuantEmbedding``
- ``calibrate.py``  activation ranges (min-max / percentile / KL) and the AWQ-style scale search
- ``quantize.py``   ``quantize_model``, the checkpoint format, ``load_quantized``
- ``qat.py``        fake-quant + straight-through estimator, then ``convert_qat``
- ``kernels.py``    fused C CPU kernels for decode (on by default where a C compiler exists)
- ``stage.py``      ``tinyseek quantize``
"""
