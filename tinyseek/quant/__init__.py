"""Weight-only quantization (W8A16 / W4A16), calibration, QAT. Read in this order:

- ``ops.py``        pure maths: symmetric scales, quantize/dequantize, int4 nibble packing
- ``formats.py``    ``QuantFormat`` and the ``FORMATS`` table (int8, int4): what every module asks
- ``modules.py``    ``QuantLinear``, ``QuantExperts`` (stacked MoE experts), ``QuantEmbedding``
- ``calibrate.py``  activation ranges (min-max / percentile / KL) and the AWQ-style scale search
- ``quantize.py``   ``quantize_model``, the checkpoint format (registered with train/checkpoint), ``load_quantized``
- ``load.py``       ``load_model`` for any checkpoint, every format registered (what upper layers call)
- ``qat.py``        fake-quant + straight-through estimator, then ``convert_qat``
- ``stage.py``      ``tinyseek quantize``

The fused C CPU kernels for decode are ``tinyseek/kernels/quant.c`` + ``quant.py`` (on by default
where a C compiler exists).
"""
